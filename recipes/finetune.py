"""Fine-tune a pre-trained ViT encoder for image classification with the official MAE fine-tuning recipe.

transformers' `run_image_classification.py` fine-tunes an exported encoder too, but with none of MAE's recipe; this
one adds layer-wise lr decay, Mixup / CutMix with soft-target cross-entropy, RandAugment and random erasing, drop
path, global average pooling and label smoothing, on the HF Trainer (see `hf_mto/finetuning.py`):

    # the tiny CPU preset: the encoder of the tiny pre-training run, 2 epochs on 10k Fashion-MNIST images
    python recipes/pretrain.py
    python recipes/export_encoder.py --checkpoint outputs/vit-mae-mto-tiny \
        --output_dir outputs/vit-mae-mto-tiny-encoder
    accelerate launch recipes/finetune.py --config recipes/configs/tiny_cpu_finetune.yaml

    # ViT-B/16 on ImageNet-1K, MAE's setting (100 epochs, total batch 1024 = 128 per device x 8 processes)
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml --num_processes 8 \
        recipes/finetune.py --config recipes/configs/vit_base_finetune_in1k.yaml \
        --model_name_or_path outputs/vit-base-mae-mto-in1k-encoder --output_dir outputs/vit-base-mae-mto-in1k-ft

--model_name_or_path also takes a pre-training checkpoint of ours directly (its encoder is exported on the fly) or
any transformers ViT checkpoint (model_type vit). Every flag of `FinetuneArguments`, `FinetuneTrainingArguments`
(hf_mto/finetuning.py; the latter extends transformers' `TrainingArguments`) and `DataArguments` (hf_mto/data.py)
can be set in the YAML/JSON preset or on the command line; the command line wins. The learning rate is
`base_learning_rate x total batch / 256`. The output folder holds the classifier and its image processor: a plain
`vit` checkpoint that `AutoModelForImageClassification.from_pretrained` loads with transformers alone, or with
`--global_pool` a `vit_gap` one (load it after `import hf_mto`, or with `trust_remote_code=True`).
"""

import logging
from pathlib import Path

from hf_mto.cli import parse_args
from hf_mto.data import (
    DataArguments,
    PixelCollator,
    apply_transform,
    build_eval_transform,
    drop_unreadable_images,
    load_datasets,
)
from hf_mto.finetuning import (
    AccuracyMetric,
    FinetuneArguments,
    FinetuneTrainer,
    FinetuneTrainingArguments,
    argmax_logits,
    build_classification_model,
    build_train_transform,
    load_image_processor,
    prepare_labels,
)
from hf_mto.run import evaluate, finish, setup_run, train

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_cpu_finetune.yaml"


def main(argv=None):
    args, data_args, training_args = parse_args(
        (FinetuneArguments, DataArguments, FinetuneTrainingArguments), argv, default_config=DEFAULT_CONFIG
    )
    setup_run(training_args, logger)

    splits = load_datasets(data_args, cache_dir=args.cache_dir, seed=training_args.seed)
    if training_args.do_eval and "validation" not in splits:
        raise ValueError("--do_eval needs a validation split: give --validation_dir or a train_val_split > 0")
    label_names = prepare_labels(splits)
    model = build_classification_model(args, label_names)
    image_processor = load_image_processor(args, model.config)
    logger.info(
        "fine-tuning %s (%s, %.2fM parameters, %.2fM trainable) on %d classes; learning rate %.3g (total batch %d), "
        "layer decay %s, mixup %s",
        args.model_name_or_path,
        type(model).__name__,
        model.num_parameters() / 1e6,
        model.num_parameters(only_trainable=True) / 1e6,
        len(label_names),
        training_args.learning_rate,
        training_args.total_train_batch_size,
        training_args.layer_decay,
        "on" if training_args.use_mixup else "off",
    )

    size = model.config.image_size
    mean, std = image_processor.image_mean, image_processor.image_std
    train_dataset = apply_transform(splits["train"], build_train_transform(size, mean, std, args))
    eval_dataset = None
    if "validation" in splits:
        validation = splits["validation"]
        if training_args.world_size > 1:
            # Skipping an unreadable image at read time would give the processes batches of different sizes,
            # which the gathering of predictions cannot take: drop them once, up front (the split is small).
            validation = drop_unreadable_images(validation, split="validation")
        eval_dataset = apply_transform(validation, build_eval_transform(size, mean, std, args.eval_crop_pct))

    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=image_processor,
        data_collator=PixelCollator(include_labels=True),
        compute_metrics=AccuracyMetric(),
        preprocess_logits_for_metrics=argmax_logits,
    )

    if training_args.do_train:
        train(trainer)

    metrics = evaluate(trainer) if training_args.do_eval else {}

    if training_args.push_to_hub:
        trainer.push_to_hub(tags=["image-classification", "vit", "hf-mto"], finetuned_from=args.model_name_or_path)

    finish(trainer)
    return metrics


if __name__ == "__main__":
    main()
