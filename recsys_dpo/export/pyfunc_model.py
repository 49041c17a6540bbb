"""The bundle as an MLflow pyfunc, logged as models-from-code (`recsys_dpo.export.bundle.
log_pyfunc`): MLflow copies this file into the model and runs it on load, so nothing is
unpickled. It needs mlflow, pandas and the bundle's serve.py, which the model carries in its
`code_paths` (MLflow puts them on sys.path before loading); never recsys_dpo.

Input rows: `user_id` (a known user, its stored history) or `history` (item ids, oldest first),
and optional `k` (default 10). Output: one row per recommendation, `row` (the input row) with
user_id, rank (1..k), item_id and score.
"""

from typing import Any

import mlflow
import pandas as pd

COLUMNS = ["row", "user_id", "rank", "item_id", "score"]


class BundleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from serve import Recommender  # from code_paths; not importable at logging time

        self.served = Recommender(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        out = []
        for row, record in enumerate(model_input.to_dict("records")):
            history, user = record.get("history"), record.get("user_id")
            query = [str(i) for i in history] if history is not None else str(user)
            k = record.get("k")
            recs = self.served.recommend(query, 10 if pd.isna(k) else int(k))
            out += [(row, user, r, i, s) for r, (i, s) in enumerate(recs, start=1)]
        return pd.DataFrame(out, columns=COLUMNS)


mlflow.models.set_model(BundleModel())
