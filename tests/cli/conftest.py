"""The verbs run on the fixtures of the layers they drive (shared from those layers' tests)."""

from tests.data.test_filter import shard_dir  # noqa: F401  (fixtures, all of this block)
from tests.data.test_translate import source, tiny_marian  # noqa: F401
from tests.eval.conftest import tiny_clip_dir  # noqa: F401
from tests.eval.test_eval_winrate_e2e import caption_files, image_dir  # noqa: F401
from tests.infer.conftest import image_inputs, tiny, tiny_ckpt  # noqa: F401
