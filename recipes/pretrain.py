"""Pre-train a ViT with masked image modeling and Masked Token Optimization (MTO).

One GPU, many GPUs or CPU, through accelerate and the HF Trainer:

    # the tiny CPU preset on the embedded default data (Fashion-MNIST), a few minutes on 2 cores
    accelerate launch recipes/pretrain.py

    # a preset plus overrides
    accelerate launch recipes/pretrain.py --config recipes/configs/vit_base_mae_mto_in1k.yaml \
        --dataset_name imagenet-1k --output_dir outputs/vit-b-mae-mto --push_to_hub

    # several processes (CPU test: torchrun --nproc_per_node 2 recipes/pretrain.py ...)
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/pretrain.py --config ...

Every flag of `ModelArguments` (hf_mto/cli.py), `DataArguments` (hf_mto/data.py), `EncoderEvalArguments`
(hf_mto/evaluation.py: `--encoder_eval` adds k-NN and linear-probe accuracy to every evaluation) and
`MTOTrainingArguments` (hf_mto/training_args.py, which extends transformers' `TrainingArguments`) can be set in the
YAML/JSON file or on the command line; the command line wins.
"""

import logging
from pathlib import Path

from hf_mto.analysis import ReconstructionCallback
from hf_mto.cli import ModelArguments, build_config, build_model, parse_args
from hf_mto.data import (
    DataArguments,
    PixelCollator,
    apply_transform,
    build_eval_transform,
    build_image_processor,
    load_datasets,
    skipped_images,
)
from hf_mto.evaluation import EncoderEvalArguments, EncoderEvalCallback, labelled_eval_splits
from hf_mto.methods import method_for
from hf_mto.run import evaluate, finish, setup_run, train
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_cpu_mae_mto.yaml"


def main(argv=None):
    model_args, data_args, eval_args, training_args = parse_args(
        (ModelArguments, DataArguments, EncoderEvalArguments, MTOTrainingArguments),
        argv,
        default_config=DEFAULT_CONFIG,
    )
    setup_run(training_args, logger)

    config = build_config(model_args)
    model = build_model(model_args, config)
    image_processor = build_image_processor(config)
    logger.info(
        "model %s: %.2fM parameters; learning rate %.3g (total batch %d); MTO weights %s",
        model_args.model_type,
        model.num_parameters() / 1e6,
        training_args.learning_rate,
        training_args.total_train_batch_size,
        training_args.mto_weights() if training_args.use_mto else "off",
    )

    try:
        datasets = load_datasets(data_args, cache_dir=model_args.cache_dir, seed=training_args.seed)
    except (
        ValueError,
        ConnectionError,
    ) as error:  # wrong name, column or folder, or offline: the message says what to do
        raise SystemExit(f"pretrain.py: {error}") from None
    size, mean, std = image_processor.size["height"], image_processor.image_mean, image_processor.image_std
    # the method's transforms: one view per forward argument its model takes (MAE and SimMIM: pixel_values)
    method = method_for(model)
    train_dataset = apply_transform(datasets["train"], method.pretraining_transform(size, mean, std))
    eval_dataset = apply_transform(datasets["validation"], method.evaluation_transform(size, mean, std))

    trainer = MTOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=image_processor,
        data_collator=PixelCollator(),
        model_card_kwargs={"data_args": data_args},  # the card in every checkpoint (and on the Hub) names the data
    )
    fsdp1 = trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2
    if fsdp1 and (training_args.reconstruction_images > 0 or eval_args.encoder_eval):
        # Both run the model's submodules outside its forward, on the weights gathered whole (FSDP2's, see
        # hf_mto.evaluation.unsharded_model); FSDP1's flattened parameters are not gathered there.
        logger.warning(
            "FSDP version 1: reconstruction pictures and --encoder_eval are off; set fsdp_version: 2 "
            "(recipes/accelerate_configs/fsdp.yaml) to keep them"
        )
        training_args.reconstruction_images, eval_args.encoder_eval = 0, False
    if training_args.do_eval and training_args.reconstruction_images > 0 and method.reconstructs_pixels:
        ReconstructionCallback(eval_dataset, mean, std, num_images=training_args.reconstruction_images).attach(trainer)
    if eval_args.encoder_eval:
        # k-NN and linear-probe accuracy of the frozen encoder at every evaluation, logged like any metric
        encoder_transform = build_eval_transform(size, mean, std)  # one view: the frozen encoder's features
        bank, queries = labelled_eval_splits(datasets, encoder_transform, eval_args, seed=training_args.seed)
        EncoderEvalCallback.from_args(bank, queries, eval_args).attach(trainer)

    if training_args.do_train:
        train(trainer)

    if skipped_images():
        logger.warning("%d unreadable images were skipped (each named in a warning above)", len(skipped_images()))

    if training_args.do_eval:
        evaluate(trainer)

    if training_args.push_to_hub:
        # saves the model and its card first; a Hub failure is a warning (MTOTrainer.push_to_hub)
        trainer.push_to_hub(tags=["masked-image-modeling", "mto", model_args.model_type])
    else:
        trainer.create_model_card()  # the card of output_dir, now with the final evaluation

    finish(trainer)


if __name__ == "__main__":
    main()
