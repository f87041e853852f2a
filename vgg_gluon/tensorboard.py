"""`--tensorboard DIR`: the run's scalars, network graph and mistakes as TensorBoard event files.

tensorboardX writes the files (TensorBoard itself is not needed to write them; `tensorboard
--logdir DIR` shows them). Scalars: every progress reading of the training loop (step/…: running
loss and accuracy, learning rate, img/s, at the global step) and every epoch (epoch/…: train,
test and validation loss and accuracy, learning rate, img/s). The graph is the network's MXNet
symbol turned into TensorBoard's GraphDef; the mistakes grid is the report's mistakes.png.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from vgg_gluon.errors import UserError

EPOCH_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "lr", "img_per_s")


class TensorBoardError(UserError):
    """One user-facing line (tensorboardX missing, folder not writable)."""


class TensorBoardLog:
    """A SummaryWriter in `logdir`, fed by the console's progress and epoch callbacks."""

    def __init__(self, logdir: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise TensorBoardError("--tensorboard needs tensorboardX: pip install -c constraints.txt "
                                   "tensorboardX (make setup installs it)") from None
        try:
            Path(logdir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(logdir))
        except OSError as exc:
            raise TensorBoardError(f"{logdir}: cannot write TensorBoard files ({exc.strerror or exc})") from None

    def progress(self, p) -> None:
        step = (p.epoch - 1) * p.steps + p.step
        for key, value in (("loss", p.loss), ("acc", p.acc), ("lr", p.lr), ("img_per_s", p.img_per_s)):
            self.writer.add_scalar(f"step/{key}", value, step)

    def epoch(self, row: Dict[str, Any]) -> None:
        for key in EPOCH_KEYS:
            if isinstance(row.get(key), (int, float)):
                self.writer.add_scalar(f"epoch/{key}", row[key], row["epoch"])
        self.writer.flush()

    def graph(self, net, input_shape) -> None:
        """The network as TensorBoard's graph: one node per MXNet symbol node, edges from its inputs."""
        import mxnet as mx
        from tensorboardX.proto.graph_pb2 import GraphDef
        from tensorboardX.proto.node_def_pb2 import NodeDef
        nodes = json.loads(net(mx.sym.var("data")).tojson())["nodes"]
        graph = GraphDef()
        for node in nodes:
            op = "Variable" if node["op"] == "null" else node["op"]
            graph.node.append(NodeDef(name=node["name"], op=op, input=[nodes[i[0]]["name"] for i in node["inputs"]]))
        self.writer._get_file_writer().add_onnx_graph(graph)   # writes any GraphDef, whatever it came from
        self.writer.add_text("network", f"input {tuple(input_shape)}, {len(nodes)} symbol nodes", 0)

    def image(self, tag: str, png: Path, step: int) -> None:
        import numpy as np
        from PIL import Image
        with Image.open(png) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
