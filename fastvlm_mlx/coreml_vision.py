"""The vision encoder run by CoreML (macOS only), as Apple's FastVLM app does it.

``load(path, vision_backend="coreml")`` puts a ``CoreMLVisionTower`` in place of ``model.vision_tower``:
images are encoded by ``path/fastvithd.mlpackage`` (Neural Engine / GPU, chosen by CoreML) and the
projector and decoder keep running in MLX.  The package is the one ``python -m fastvlm_mlx.convert
--coreml`` writes, or the one shipped with Apple's app.
"""

import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import FastVLMError

PACKAGE_NAME = "fastvithd.mlpackage"  # the name Apple's app (and convert/coreml.py) use
INPUT_NAME = "images"
OUTPUT_NAME = "image_features"


class CoreMLVisionTower:
    """Callable like ``FastViTHD``: (B, S, S, 3) NHWC pixels in [0, 1] -> (B, S/64, S/64, C) float32 features.

    ``predict`` takes and returns dicts of numpy arrays (or, for an image input, a PIL image), the
    interface of ``coremltools.models.MLModel.predict``; ``open`` builds one from a package.
    """

    def __init__(
        self, predict: Callable[[dict], dict], resolution: int, image_input: bool = False, source: str = "CoreML"
    ):
        self.predict = predict
        self.resolution = resolution
        self.image_input = image_input
        self.source = source
        self.dtype = mx.float32  # the package's input, whatever its compute precision

    @classmethod
    def open(cls, package: Path) -> "CoreMLVisionTower":
        package = Path(package)
        if sys.platform != "darwin":
            raise FastVLMError(
                f"vision_backend='coreml' runs CoreML, which needs macOS (this is {sys.platform}); "
                "use vision_backend='mlx'"
            )
        if not package.exists():
            raise FastVLMError(
                f"{package}: no CoreML vision encoder; export one with "
                "python -m fastvlm_mlx.convert --hf-path MODEL --coreml-only --mlx-path MODEL"
            )
        try:
            import coremltools as ct
        except ImportError:
            raise FastVLMError(
                "vision_backend='coreml' needs coremltools, which is not installed: pip install 'fastvlm-mlx[coreml]'"
            ) from None
        try:
            mlmodel = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.ALL)
        except Exception as e:  # CoreML reports a bad package in many ways
            raise FastVLMError(f"{package}: CoreML could not load it ({type(e).__name__}: {e})") from None
        spec = mlmodel.get_spec().description
        inputs = {i.name: i for i in spec.input}
        outputs = {o.name for o in spec.output}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise FastVLMError(
                f"{package}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found inputs "
                f"{sorted(inputs)} and outputs {sorted(outputs)} (a package exported with the projector "
                "included cannot be used here)"
            )
        kind = inputs[INPUT_NAME].type.WhichOneof("Type")
        if kind == "imageType":
            resolution = int(inputs[INPUT_NAME].type.imageType.width)
        else:
            resolution = int(inputs[INPUT_NAME].type.multiArrayType.shape[-1])
        return cls(mlmodel.predict, resolution, kind == "imageType", str(package))

    def _encode_one(self, pixels: np.ndarray) -> np.ndarray:
        """(S, S, 3) float32 in [0, 1] -> (h, w, C)."""
        if self.image_input:
            from PIL import Image

            image = Image.fromarray(np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8), "RGB")
            out = self.predict({INPUT_NAME: image})
        else:
            out = self.predict({INPUT_NAME: np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])})
        features = np.asarray(out[OUTPUT_NAME], dtype=np.float32)  # (1, h*w, C), row-major tokens
        side = self.resolution // 64
        return features.reshape(side, side, features.shape[-1])

    def __call__(self, pixels: mx.array) -> mx.array:
        b, s, s2, c = pixels.shape
        if s != self.resolution or s2 != self.resolution or c != 3:
            raise FastVLMError(
                f"{self.source}: expects (B, {self.resolution}, {self.resolution}, 3) pixels, got {pixels.shape}"
            )
        batch = np.array(pixels.astype(mx.float32))
        return mx.array(np.stack([self._encode_one(image) for image in batch]))
