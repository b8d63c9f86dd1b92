"""`python -m lingmao.generate model_dir=DIR prompt=...`: sample text or verse from a trained model.

With num_samples=1 the text is printed as it is produced; several samples are generated in one
batch and printed one after the other. Messages go to stderr, poems to stdout.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from lingmao.cli import quote_unicode_overrides, report_config_errors
from lingmao.errors import LingmaoError, exit_on_user_error

log = logging.getLogger(__name__)


def load_for_inference(cfg: DictConfig):
    """The model of `model_dir=` or `ckpt=` (exactly one of them) on `device=`."""
    from lingmao.export import LingmaoModel, load_model
    from lingmao.sampling import resolve_device

    if bool(cfg.get("model_dir")) == bool(cfg.get("ckpt")):
        raise LingmaoError("give exactly one of model_dir=DIR (an exported model) or ckpt=PATH (a checkpoint)")
    device = resolve_device(cfg.get("device", "auto"))
    if cfg.get("model_dir"):
        return load_model(cfg.model_dir, device=device)
    return LingmaoModel.from_checkpoint(cfg.ckpt, tokenizer=cfg.get("tokenizer"), device=device)


def run(cfg: DictConfig) -> list[str]:
    import random

    lm = load_for_inference(cfg)
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
    log.info("device %s, seed %d", lm.device, seed)
    streaming = cfg.num_samples == 1
    if streaming:
        # The prompt is printed as typed; what follows is the model's (after data.convert of the prompt).
        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        sys.stdout.write(cfg.prompt or "")
        sys.stdout.flush()
    texts = lm.generate(
        cfg.prompt or "", form=cfg.form, acrostic=cfg.acrostic, rhyme=cfg.rhyme, title=cfg.title,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
        max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_samples, seed=seed, convert=cfg.convert,
        context_length=cfg.context_length, stream=stream if streaming else None,
    )
    if streaming:
        sys.stdout.write("\n")
    else:
        for i, text in enumerate(texts, start=1):
            sys.stdout.write(f"--- {i} ---\n{text}\n")
    sys.stdout.flush()
    return texts


@report_config_errors()
@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr, force=True)
    with exit_on_user_error(bool(cfg.get("debug"))):
        run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = quote_unicode_overrides(sys.argv[1:])
    main()
