"""The keys under which `MTOTrainer` logs its metrics, shared by the trainer and by the readers of its log history
(the model card), so that neither has to import the other."""

MTO_TERMS = ("sparsity_loss", "singularity_loss", "ranking_loss")  # the models' output fields, logged as mto/<name>
HETEROGENEITY_PREFIX = "mto/heterogeneity/layer_"  # + l: the batch-mean heterogeneity H^l

__all__ = ["HETEROGENEITY_PREFIX", "MTO_TERMS"]
