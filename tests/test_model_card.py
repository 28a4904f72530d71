"""Model cards: rendered from `model_cards/`, written into every checkpoint by MTOTrainer, pushed by `push_to_hub`."""

import concurrent.futures
import importlib.resources
import json
from pathlib import Path

import jinja2
import pytest
import torch
import transformers
from conftest import TINY_MAE, TINY_SIMMIM, RandomImages
from huggingface_hub import ModelCard
from transformers import TrainerState, ViTConfig, ViTMAEConfig

from hf_mto import SimMIMMTOConfig, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.data import DataArguments
from hf_mto.model_card import (
    DEFAULT_TEMPLATE,
    MAX_CURVE_ROWS,
    fmt,
    render_model_card,
    summarise_log_history,
    write_model_card,
)
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments

REPO_ROOT = Path(__file__).resolve().parent.parent
CITATIONS = (
    "arXiv:2404.08330",
    "Emerging Property of Masked Token for Effective Pre-training",
    "Evolved Hierarchical Masking for Self-Supervised Learning",
    "Feng, Zhanzhou and Zhang, Shiliang",
    "Masked Autoencoders Are Scalable Vision Learners",  # the method's own paper (this card's model is MAE's)
)


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        mto_spa_weight=0.1,
        mto_e_weight=0.2,
        mto_r_weight=0.3,
        use_cpu=True,
        seed=0,
    )
    return MTOTrainingArguments(**{**kwargs, **overrides})


def make_trainer(tmp_path, model_card_kwargs=None, **overrides):
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    return MTOTrainer(
        model=model,
        args=make_args(tmp_path, **overrides),
        train_dataset=RandomImages(),
        eval_dataset=RandomImages(16),
        model_card_kwargs=model_card_kwargs,
    )


def loss_row(label, key, entry, eval_entry):
    return f"| {label} | `{key}` | {fmt(entry.get(key))} | {fmt(eval_entry.get('eval_' + key))} |"


def check_card_matches_log(card: str, log_history: list[dict]):
    """The card shows the last training log's losses, the last evaluation's, and H per layer from both."""
    train = [e for e in log_history if "reconstruction_loss" in e and "eval_loss" not in e][-1]
    evaluation = [e for e in log_history if "eval_loss" in e][-1]
    assert loss_row("total (weighted sum)", "loss", train, evaluation) in card
    assert loss_row("reconstruction", "reconstruction_loss", train, evaluation) in card
    for symbol, key in (("L_spa", "sparsity_loss"), ("L_e", "singularity_loss"), ("L_r", "ranking_loss")):
        assert loss_row(f"{symbol} (unweighted)", f"mto/{key}", train, evaluation) in card
    for layer in range(TINY_MAE["decoder_num_hidden_layers"] + 1):  # H^0 .. H^L of the decoder
        key = f"mto/heterogeneity/layer_{layer}"
        assert f"| {layer} | {fmt(train[key])} | {fmt(evaluation['eval_' + key])} |" in card


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of MAE + MTO, logging, evaluating and saving every 2 steps, then `save_model`."""
    tmp_path = tmp_path_factory.mktemp("card")
    trainer = make_trainer(tmp_path, model_card_kwargs={"data_args": DataArguments(max_train_samples=32)})
    trainer.train()
    trainer.save_model()
    return trainer


@pytest.mark.parametrize("step", [2, 4])
def test_every_checkpoint_holds_a_card_of_its_own_step(trained, step):
    folder = Path(trained.args.output_dir) / f"checkpoint-{step}"
    card = (folder / "README.md").read_text()
    # the losses are those logged up to this checkpoint, not the run's last
    check_card_matches_log(card, json.loads((folder / "trainer_state.json").read_text())["log_history"])
    assert f"Checkpoint at step {step} " in card
    metadata = ModelCard(card).data
    assert metadata.library_name == "transformers"
    assert {"masked-image-modeling", "mto", "vit_mae_mto"} <= set(metadata.tags)
    assert metadata.datasets == ["zalando-datasets/fashion_mnist"]
    assert metadata.base_model is None  # pre-trained from scratch
    for citation in CITATIONS:
        assert citation in card
    assert "SimMIM: A Simple Framework" not in card  # another method's paper
    # MTO weights, as set: the weighted sum and the table
    assert "loss = reconstruction + 0.1 * L_spa + 0.2 * L_e + 0.3 * L_r" in card
    assert "| L_r (`ranking_loss`) | Eq. 7 (ranking) | 0.3 | yes |" in card
    assert "embedded Fashion-MNIST default" in card and "Training images: 32; evaluation images: 16." in card
    assert f"- transformers {transformers.__version__}" in card and f"- torch {torch.__version__}" in card
    assert "| total batch size | 8 (8 per device x 1 accumulation x 1 process) |" in card
    assert "| hardware | 1 CPU |" in card and "| precision | fp32 (no mixed precision) |" in card
    assert f'AutoModelForPreTraining.from_pretrained("{folder}")' in card
    assert f'AutoModelForPreTraining.from_pretrained("{folder}", trust_remote_code=True)' in card


def test_save_model_writes_the_final_card(trained):
    card = (Path(trained.args.output_dir) / "README.md").read_text()
    check_card_matches_log(card, trained.state.log_history)
    assert "Checkpoint at step" not in card  # the final model, not a checkpoint


def test_create_model_card_takes_push_to_hub_arguments(trained, monkeypatch):
    monkeypatch.setattr(trained, "model_card_kwargs", {**trained.model_card_kwargs, "tags": ["recorded-tag"]})
    trained.create_model_card(
        model_name="tiny-mae-mto", tags=["my-tag"], dataset="user/images", dataset_args="small", license="mit"
    )
    card = ModelCard.load(Path(trained.args.output_dir) / "README.md")
    assert card.data.license == "mit" and card.data.datasets == ["user/images"]
    assert {"my-tag", "recorded-tag", "mto", "hf-mto"} <= set(card.data.tags)
    assert card.text.lstrip().startswith("# tiny-mae-mto")
    assert "configuration `small`" in card.text
    check_card_matches_log(card.content, trained.state.log_history)


class FakeHubApi:
    """Stands in for the Hub client the Trainer calls: records the card of every uploaded folder."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, run_as_future=False, path_in_repo=None, **kwargs):
        card = Path(folder_path, "README.md")
        self.uploads.append((repo_id, path_in_repo, card.read_text() if card.is_file() else None))
        if not run_as_future:
            return None
        future = concurrent.futures.Future()
        future.set_result(None)
        return future


def test_push_to_hub_uploads_our_card(tmp_path, monkeypatch):
    api = FakeHubApi()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: api)
    trainer = make_trainer(tmp_path, push_to_hub=True, hub_model_id="tiny-run", hub_strategy="every_save")
    trainer.train()
    trainer.push_to_hub(tags=["masked-image-modeling", "mto", "vit_mae_mto"])
    # one upload per checkpoint, then the final one; every one carries our card
    assert [upload[0] for upload in api.uploads] == ["user/tiny-run"] * 3
    for step, (_, _, card) in zip((2, 4), api.uploads[:2], strict=True):
        assert card == (Path(trainer.args.output_dir) / f"checkpoint-{step}" / "README.md").read_text()
        assert f"Checkpoint at step {step} " in card
    final = api.uploads[-1][2]
    check_card_matches_log(final, trainer.state.log_history)
    assert 'AutoModelForPreTraining.from_pretrained("user/tiny-run")' in final
    assert "# tiny-run" in final


def test_card_failure_does_not_cost_the_checkpoint(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("template broken")

    monkeypatch.setattr("hf_mto.model_card.render_model_card", broken)
    trainer = make_trainer(tmp_path, max_steps=2, eval_strategy="no")
    trainer.train()
    folder = Path(trainer.args.output_dir) / "checkpoint-2"
    assert (folder / "model.safetensors").is_file() and not (folder / "README.md").exists()
    assert "template broken" in caplog.text


def simmim_state(log_history, step=10, epoch=2.0):
    state = TrainerState()
    state.log_history, state.global_step, state.epoch = log_history, step, epoch
    return state


def test_simmim_card_with_evolved_masking(tmp_path):
    config = SimMIMMTOConfig(**TINY_SIMMIM, mto_spa_layers=[0, 1])
    args = make_args(
        tmp_path, masking="evolved", evolved_f0=0.2, evolved_f1=0.8, evolved_attention_layers=1, mto_e_weight=0.0
    )
    log = [
        {"step": 10, "epoch": 2.0, "loss": 0.9, "reconstruction_loss": 0.8, "mto/sparsity_loss": 3.0,
         "mto/singularity_loss": 0.5, "mto/ranking_loss": 1.5, "mto/heterogeneity/layer_0": 2.5,
         "mto/heterogeneity/layer_1": 2.25, "mto/heterogeneity/layer_2": 2.0, "evolved/depth": 3.0,
         "evolved/tree_height": 9.5},
    ]  # fmt: skip
    card = render_model_card(config, args, simmim_state(log), repo_id="user/simmim")
    assert 'AutoModelForMaskedImageModeling.from_pretrained("user/simmim", trust_remote_code=True)' in card
    assert "Masked Token Optimization (MTO)** on the encoder" in card
    assert "**f0 = 0.2, f1 = 0.8**" in card and "in its first\n1 block(s)" in card
    assert "t the training progress (the fraction of the run's optimizer steps done" in card
    assert "`evolved`, evolved hierarchical masking, mask ratio 0.6" in card
    assert "| L_e (`singularity_loss`) | Eq. 6 (singularity) | 0 | no |" in card
    assert "- L_spa on states: H^0, H^1" in card
    assert "| 1 | 2.25 | – |" in card
    assert "mean depth 3 of a mean tree height\n9.5" in card
    assert "evolved-hierarchical-masking" in ModelCard(card).data.tags
    assert "decoder" not in card.split("## Data")[0]  # SimMIM has none


def test_card_without_training_arguments_says_what_is_unknown():
    card = render_model_card(ViTMAEMTOConfig(**TINY_MAE), repo_id="user/plain")
    assert "The MTO weights were not recorded" in card and "mto" in ModelCard(card).data.tags
    assert "No training arguments were recorded" in card and "No training losses were logged yet" in card
    assert "Not recorded with this card" in card
    assert "random patches (MAE's own masking) (the model's default; the training arguments were not recorded)" in card


def test_card_with_mto_off(tmp_path):
    args = make_args(tmp_path, mto_spa_weight=0.0, mto_e_weight=0.0, mto_r_weight=0.0)
    card = render_model_card(ViTMAEMTOConfig(**TINY_MAE), args, repo_id="user/plain")
    assert "MTO was off (all three weights 0)" in card and "mto" not in ModelCard(card).data.tags
    assert "| L_spa (`sparsity_loss`)" not in card


def test_data_section_names_the_hub_dataset(tmp_path):
    data_args = DataArguments(dataset_name="user/pictures", dataset_config_name="full")
    card = render_model_card(ViTMAEMTOConfig(**TINY_MAE), data_args=data_args, base_model="user/start")
    assert "Hub dataset [`user/pictures`](https://huggingface.co/datasets/user/pictures), configuration `full`" in card
    metadata = ModelCard(card).data
    assert metadata.datasets == ["user/pictures"] and metadata.base_model == "user/start"
    card = render_model_card(ViTMAEMTOConfig(**TINY_MAE), data_args=DataArguments(train_dir=str(tmp_path)))
    assert f"Local image folder `{tmp_path}`" in card and ModelCard(card).data.datasets is None


def test_summarise_log_history_takes_the_last_logs_and_orders_layers():
    history = [
        {"step": 1, "epoch": 0.1, "loss": 3.0, "reconstruction_loss": 2.0, "mto/heterogeneity/layer_2": 9.0},
        {"step": 2, "epoch": 0.2, "loss": 2.0, "reconstruction_loss": 1.5, "mto/heterogeneity/layer_10": 1.0,
         "mto/heterogeneity/layer_2": 2.0},
        {"step": 2, "epoch": 0.2, "eval_loss": 1.8, "eval_knn_accuracy": 0.75, "eval_runtime": 3.0,
         "eval_samples_per_second": 10.0, "eval_mto/heterogeneity/layer_2": 2.5, "eval_reconstruction_loss": 1.7},
        {"step": 2, "epoch": 0.2, "train_runtime": 5.0, "train_loss": 2.5},
    ]  # fmt: skip
    summary = summarise_log_history(history)
    assert summary["final"]["step"] == 2 and summary["final"]["reconstruction_loss"] == 1.5
    assert summary["heterogeneity"] == [
        {"layer": 2, "train": 2.0, "eval": 2.5},
        {"layer": 10, "train": 1.0, "eval": None},
    ]
    assert summary["evaluation"]["metrics"] == [("eval_knn_accuracy", 0.75)]
    assert [(row["key"], row["train"], row["eval"]) for row in summary["losses"]] == [
        ("loss", 2.0, 1.8),
        ("reconstruction_loss", 1.5, 1.7),
    ]
    assert [row["eval_loss"] for row in summary["curve"]] == [None, 1.8]
    assert summary["evolved"] is None
    long = [{"step": i, "loss": float(i)} for i in range(1, 101)]
    curve = summarise_log_history(long)["curve"]
    assert len(curve) == MAX_CURVE_ROWS and curve[0]["step"] == 1 and curve[-1]["step"] == 100


def test_eval_metrics_from_other_callbacks_are_reported():
    history = [{"step": 4, "epoch": 1.0, "eval_loss": 0.5, "eval_knn_accuracy": 0.8125}]
    card = render_model_card(ViTMAEMTOConfig(**TINY_MAE), state=simmim_state(history, step=4, epoch=1.0))
    assert "| eval_knn_accuracy | 0.8125 |" in card


def test_fmt():
    assert [fmt(None), fmt(3), fmt(2.0), fmt(0.123456), fmt(1.5e-4), fmt(float("nan"))] == [
        "–",
        "3",
        "2",
        "0.1235",
        "0.00015",
        "nan",
    ]


def test_templates_ship_with_the_package_and_are_the_top_level_ones():
    packaged = importlib.resources.files("hf_mto").joinpath("model_cards", DEFAULT_TEMPLATE)
    assert packaged.is_file()
    assert packaged.read_text() == (REPO_ROOT / "model_cards" / DEFAULT_TEMPLATE).read_text()


def test_custom_template_and_clear_errors(tmp_path):
    config = ViTMAEMTOConfig(**TINY_MAE)
    custom = tmp_path / "mine.md.jinja"
    custom.write_text("---\n{{ card_data }}\n---\n# {{ model_name }} ({{ model.model_type }})\n")
    path = write_model_card(tmp_path / "out", config, template=custom, repo_id="user/mine")
    assert path == tmp_path / "out" / "README.md"
    assert path.read_text().endswith("# mine (vit_mae_mto)\n")
    assert render_model_card(config, template=str(custom), repo_id="user/mine") == path.read_text()  # a str path
    with pytest.raises(FileNotFoundError, match="no-such.md.jinja"):
        render_model_card(config, template="no-such.md.jinja")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        render_model_card(config, template=tmp_path / "missing.md.jinja")
    custom.write_text("{{ no_such_variable }}")
    with pytest.raises(jinja2.UndefinedError, match="no_such_variable"):
        render_model_card(config, template=custom)
    custom.write_text("---\ntags: [unclosed\n---\n")
    with pytest.raises(ValueError, match="front matter"):
        render_model_card(config, template=custom)


def test_callback_metrics_logged_after_the_evaluation_reach_the_card():
    # The Trainer logs eval_loss & co. first; EncoderEvalCallback logs its accuracies as a second entry, same step.
    history = [
        {"loss": 1.5, "reconstruction_loss": 1.0, "step": 10, "epoch": 1.0},
        {"eval_loss": 1.2, "eval_reconstruction_loss": 0.9, "step": 10, "epoch": 1.0},
        {"eval_knn_accuracy": 0.61, "eval_linear_probe_accuracy": 0.72, "step": 10, "epoch": 1.0},
    ]
    summary = summarise_log_history(history)
    metrics = dict(summary["evaluation"]["metrics"])
    assert metrics["eval_knn_accuracy"] == 0.61 and metrics["eval_linear_probe_accuracy"] == 0.72
    assert {row["key"]: row["eval"] for row in summary["losses"]}["loss"] == 1.2


def test_the_card_follows_a_registered_methods_declarations(dummy_method):
    card = render_model_card(dummy_method.config_class(**TINY_SIMMIM), repo_id="user/dummy")
    assert "**DummyMIM**" in card and "(`DummyModel`, AutoModelForMaskedImageModeling)" in card
    assert "`beit_block`, BEiT's block-wise masking (the model's default" in card
    assert 'AutoModelForMaskedImageModeling.from_pretrained("user/dummy", trust_remote_code=True)' in card


@pytest.mark.parametrize(
    "config, model_class, auto_class, masking",
    [
        (ViTMAEConfig(**TINY_MAE), "ViTMAEForPreTraining", "AutoModelForPreTraining", "random patches (MAE's own"),
        (ViTConfig(**TINY_SIMMIM), "ViTForMaskedImageModeling", "AutoModelForMaskedImageModeling", "SimMIM's square"),
    ],
    ids=["mae", "simmim"],
)
def test_upstream_models_get_the_card_of_the_method_that_extends_them(config, model_class, auto_class, masking):
    card = render_model_card(config, repo_id="user/upstream")
    assert f"(`{model_class}`, {auto_class})" in card and masking in card
    assert f'{auto_class}.from_pretrained("user/upstream")' in card and "trust_remote_code" not in card
    assert "Masked Token Optimization" not in card  # upstream classes compute no MTO terms
