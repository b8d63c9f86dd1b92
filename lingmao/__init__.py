"""lingmao (灵猫墨韵): train, resume, sweep and sample language models of classical Chinese."""

from lingmao.errors import LingmaoError
from lingmao.export import LingmaoModel, export_model, load_model
from lingmao.model import PositionalEncoding, SimpleTransformer

__all__ = ["LingmaoError", "LingmaoModel", "PositionalEncoding", "SimpleTransformer", "export_model", "load_model"]
__version__ = "0.1.0"
