"""k-NN and linear-probe accuracy of a checkpoint's frozen encoder features on a labelled dataset.

    python recipes/evaluate_encoder.py --checkpoint outputs/vit-mae-mto-tiny
    python recipes/evaluate_encoder.py --checkpoint outputs/vit-mae-mto-tiny-encoder --encoder_eval_pooling mean
    accelerate launch recipes/evaluate_encoder.py --checkpoint user/repo --dataset_name ... --output_file results.json

The checkpoint is any of ours (`ViTMAEMTOForPreTraining`, `SimMIMMTOForMaskedImageModeling`, a `checkpoint-N`
folder), an exported encoder, or any transformers ViT / ViTMAE checkpoint, local or on the Hub. The data is chosen
as for pre-training (`DataArguments`, hf_mto/data.py; default: the embedded Fashion-MNIST), with the deterministic
evaluation transform: the training split is the k-NN bank and the probe's training set, the validation split is
scored. The settings are `EncoderEvalArguments`' (hf_mto/evaluation.py: k = 20, T = 0.07, CLS token, 10k training
images). Prints the accuracies and writes them as JSON to --output_file (default: `encoder_eval.json` in the
checkpoint folder, or in the current folder for a Hub id).

(Not `recipes/evaluate.py`: `python recipes/<script>.py` puts `recipes/` first on `sys.path`, where a file named
`evaluate.py` would shadow the `evaluate` package for every recipe.)
"""

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from transformers import AutoImageProcessor, PreTrainedConfig, ViTConfig, ViTModel

import hf_mto  # noqa: F401  (registers our models with the Auto classes)
from hf_mto.checkpoints import IncompleteCheckpointError, load_pretrained, load_pretraining_checkpoint
from hf_mto.cli import parse_args
from hf_mto.data import DataArguments, build_eval_transform, build_image_processor, load_datasets
from hf_mto.evaluation import EncoderEvalArguments, evaluate_encoder, labelled_eval_splits
from hf_mto.methods import model_types
from hf_mto.models.vit_gap import ViTGAPConfig

logger = logging.getLogger(__name__)


@dataclass
class EvaluateArguments:
    checkpoint: str = field(
        metadata={"help": "Local folder or Hub id: one of our pre-training checkpoints, an exported encoder, any ViT."}
    )
    output_file: str | None = field(
        default=None,
        metadata={"help": "Where to write the JSON results. Default: <checkpoint>/encoder_eval.json (local) or ./"},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --checkpoint."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    eval_crop_pct: float = field(
        default=0.875, metadata={"help": "Resize to size / crop_pct, then centre-crop (as pre-training's eval)."}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers for the feature extraction."})
    seed: int = field(default=42, metadata={"help": "Seed of the dataset subsets."})


def load_model(checkpoint: str, **hub_kwargs) -> torch.nn.Module:
    """The model of `checkpoint` whose encoder is evaluated: a pre-training model by its method (ours, or the class
    of ours that extends an upstream one), any other ViT as `ViTModel` (without the pooler, which pre-training never
    had)."""
    config_dict, _ = PreTrainedConfig.get_config_dict(checkpoint, **hub_kwargs)
    model_type = config_dict.get("model_type")
    if model_type == ViTGAPConfig.model_type:
        # Its encoder has no final layernorm (fc_norm after pooling replaces it): as a ViTModel it would get a
        # freshly initialised one.
        raise ValueError(
            f"{checkpoint!r} is a fine-tuned vit_gap classifier; evaluate the pre-trained or exported encoder instead"
        )
    try:
        return load_pretraining_checkpoint(checkpoint, **hub_kwargs)
    except IncompleteCheckpointError:
        raise
    except ValueError:
        if model_type != ViTConfig.model_type:
            raise ValueError(
                f"cannot evaluate {checkpoint!r}: model_type {model_type!r} is not a ViT or a pre-training model "
                f"(one of {sorted(model_types())})"
            ) from None
    # a classifier's head is not the encoder's: only encoder weights must be there
    return load_pretrained(ViTModel, checkpoint, add_pooling_layer=False, **hub_kwargs)


def main(argv=None) -> dict:
    args, eval_args, data_args = parse_args((EvaluateArguments, EncoderEvalArguments, DataArguments), argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=logging.INFO,
    )
    # Without an accelerator a multi-process launch needs gloo (the default state would leave each process alone).
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    state = PartialState(cpu=cpu)
    transformers.set_seed(args.seed)
    hub_kwargs = {key: value for key, value in (("revision", args.revision), ("cache_dir", args.cache_dir)) if value}

    model = load_model(args.checkpoint, **hub_kwargs).to(state.device)
    try:
        processor = AutoImageProcessor.from_pretrained(args.checkpoint, **hub_kwargs)
    except (OSError, ValueError):
        processor = build_image_processor(model.config)
    size = model.config.image_size
    transform = build_eval_transform(size, processor.image_mean, processor.image_std, args.eval_crop_pct)
    splits = load_datasets(data_args, cache_dir=args.cache_dir, seed=args.seed)
    bank, queries = labelled_eval_splits(splits, transform, eval_args, seed=args.seed)

    results = evaluate_encoder(model, bank, queries, **eval_args.settings(), num_workers=args.num_workers)
    report = {
        "checkpoint": args.checkpoint,
        **results,
        "settings": {key: value for key, value in asdict(eval_args).items() if key != "encoder_eval"},
    }
    if state.is_main_process:
        if args.output_file is not None:
            output = Path(args.output_file)
        elif os.path.isdir(args.checkpoint):
            output = Path(args.checkpoint) / "encoder_eval.json"
        else:
            output = Path("encoder_eval.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        accuracies = ", ".join(f"{key} {value:.4f}" for key, value in results.items() if key.endswith("accuracy"))
        print(f"{args.checkpoint}: {accuracies} ({int(results['num_train'])} train / {int(results['num_eval'])} eval)")
        logger.info("wrote %s", output)
    state.wait_for_everyone()
    if state.num_processes > 1:
        torch.distributed.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
