"""Importing `models` registers every model of the repository with timm (`timm.create_model(name)`)."""
from models import localmim  # noqa: F401  (registers MIM_vit_* factories)
from models import slak  # noqa: F401  (SLaK_tiny/small/base/large)
from models import spark_custom_cnn  # noqa: F401  (your_convnet: the SparK custom-model example)
from models import vit  # noqa: F401
