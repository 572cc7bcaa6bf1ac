"""Importing `models` registers every model of the repository with timm (`timm.create_model(name)`)."""
from models import localmim  # noqa: F401  (registers MIM_vit_* factories)
from models import vit  # noqa: F401
