from .cosine_mimic_loss import CosineMimicLoss, cosine_mimic_loss

__all__ = ["CosineMimicLoss", "cosine_mimic_loss"]
