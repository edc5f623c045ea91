"""ml_collections configs: ``python train.py --config=configs/NAME.py``."""
