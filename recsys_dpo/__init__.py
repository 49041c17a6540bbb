"""recsys-dpo: preference optimisation (the DPO family) for recommenders.

Data flows one way, stage by stage, through files on disk:
logs -> validated frame -> vocab/split -> pairs parquet -> DataModule -> LightningModule
-> checkpoint -> retrieval/evaluation -> MLflow + candidate bundle.
"""

__version__ = "0.1.0"
