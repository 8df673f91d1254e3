"""dtvg_ds: DeepSpeed-scaled multi-task soft-prompt tuning (PT, DTVG, SPoT, MPT) for frozen T5 backbones."""

__version__ = "0.1.0"
