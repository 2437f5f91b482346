"""The verbs run on the fixtures of the layers they drive."""

from tests.infer.conftest import image_inputs, tiny, tiny_ckpt  # noqa: F401  (fixtures)
