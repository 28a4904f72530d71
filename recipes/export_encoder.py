"""Export the encoder of an hf_mto pre-training checkpoint as a plain transformers ViT checkpoint.

    python recipes/export_encoder.py --checkpoint outputs/vit-mae-mto-tiny --output_dir outputs/vit-mae-mto-tiny-encoder

The output (`model_type: vit`, `ViTModel` weights, image processor, model card) loads with transformers alone, e.g.
`AutoModelForImageClassification.from_pretrained(output_dir, num_labels=..., ignore_mismatched_sizes=True)`, and
fine-tunes with transformers' `examples/pytorch/image-classification/run_image_classification.py`. Works for both
`ViTMAEMTOForPreTraining` and `SimMIMMTOForMaskedImageModeling` checkpoints (a local folder or a Hub id); see
`hf_mto/export.py` for what is carried over and why.
"""

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_mto.export import export_encoder

logger = logging.getLogger(__name__)


@dataclass
class ExportArguments:
    checkpoint: str = field(
        metadata={"help": "Local folder or Hub id of a ViTMAEMTOForPreTraining / SimMIMMTOForMaskedImageModeling."}
    )
    output_dir: str = field(metadata={"help": "Where to write the plain ViT checkpoint."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --checkpoint."})
    push_to_hub: bool = field(default=False, metadata={"help": "Also push the exported folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo to push to (with --push_to_hub)."})


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else argv
    )
    hub_kwargs = {"revision": args.revision} if args.revision else {}
    path = export_encoder(args.checkpoint, args.output_dir, **hub_kwargs)
    logger.info("exported the encoder of %s to %s (model_type: vit)", args.checkpoint, path)
    if args.push_to_hub:
        from huggingface_hub import HfApi

        repo_id = args.hub_model_id or path.name
        api = HfApi()
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(path), commit_message="Export ViT encoder (hf_mto)")
        logger.info("pushed to https://huggingface.co/%s", repo_id)
    return str(path)


if __name__ == "__main__":
    main()
