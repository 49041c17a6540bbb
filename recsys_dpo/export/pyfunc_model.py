"""The bundle as an MLflow pyfunc, logged as models-from-code (`recsys_dpo.export.bundle.
log_pyfunc`): MLflow copies this file into the model and runs it on load, so nothing is
unpickled. It needs mlflow, pandas and the bundle's serve.py, which the model carries in its
`code_paths` (MLflow puts them on sys.path before loading); never recsys_dpo.

Input rows: `user_id` (a known user, served with its stored history) or, where user_id is
null or absent, `history` (item ids, oldest first); optional `k` (default 10). A request that
mixes both kinds names both columns in every row (`"history": []`, `"user_id": null`): MLflow's
schema check refuses a missing history. Output: one row per recommendation: `row` (the input
row), user_id, rank (1..k), item_id, score. A query the bundle cannot answer (an unknown user)
is a 400 naming it.
"""

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

COLUMNS = ["row", "user_id", "rank", "item_id", "score"]


class BundleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from serve import Recommender  # from code_paths; not importable at logging time

        self.served = Recommender(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        from serve import BundleError

        out = []
        for row, record in enumerate(model_input.to_dict("records")):
            user, k = record.get("user_id"), record.get("k")
            user = None if user is None or pd.isna(user) else str(user)
            history = record.get("history")
            history = [] if history is None or isinstance(history, float) else history  # NaN
            query = user if user is not None else [str(i) for i in history]
            try:
                recs = self.served.recommend(query, 10 if k is None or pd.isna(k) else int(k))
            except BundleError as err:
                raise MlflowException(f"row {row}: {err}", INVALID_PARAMETER_VALUE) from None
            out += [(row, user, r, i, s) for r, (i, s) in enumerate(recs, start=1)]
        return pd.DataFrame(out, columns=COLUMNS)


mlflow.models.set_model(BundleModel())
