"""An unreachable Hub never costs a run or a checkpoint: offline, `--push_to_hub` warns and training goes on."""

import logging

import torch
from conftest import TINY_MAE

from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.checkpoints import load_pretrained
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments


def test_offline_push_to_hub_keeps_every_checkpoint_and_finishes(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    images = [{"pixel_values": torch.randn(3, 32, 32)} for _ in range(32)]
    args = MTOTrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=4,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        push_to_hub=True,
        hub_model_id="someone/tiny-mae-mto",
        hub_strategy="every_save",
    )
    with caplog.at_level(logging.WARNING, logger="hf_mto.hub"):
        trainer = MTOTrainer(model=model, args=args, train_dataset=images)  # creating the repo fails: a warning
        trainer.train()
        assert trainer.push_to_hub() is None  # the final upload fails: a warning, not an exception
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Creating the repository on the Hub (someone/tiny-mae-mto) failed") for m in messages)
    assert any(m.startswith("Pushing the final model") and "hf upload someone/tiny-mae-mto" in m for m in messages)
    # every save happened, the limit was respected, and the final model is the trained one
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    final = load_pretrained(type(trainer.model), tmp_path).state_dict()  # the file holds upstream's legacy names
    trained = trainer.model.state_dict()
    assert final.keys() == trained.keys()
    assert all(torch.equal(final[k], trained[k]) for k in trained)
    assert (tmp_path / "README.md").is_file() and (tmp_path / "checkpoint-6" / "README.md").is_file()


def test_errors_no_retry_can_fix_still_stop_the_run_before_training(tmp_path, monkeypatch):
    import httpx2
    import pytest
    import transformers.trainer
    from huggingface_hub.errors import HfHubHTTPError

    class NoWriteAccess:
        def create_repo(self, *args, **kwargs):
            request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
            raise HfHubHTTPError("403 Forbidden: no write access", response=httpx2.Response(403, request=request))

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: NoWriteAccess())
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    args = MTOTrainingArguments(output_dir=str(tmp_path), report_to="none", push_to_hub=True, hub_model_id="a/b")
    with pytest.raises(HfHubHTTPError, match="403"):
        MTOTrainer(model=model, args=args, train_dataset=[{"pixel_values": torch.randn(3, 32, 32)}])
