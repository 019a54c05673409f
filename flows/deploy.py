"""Deployments: the pipeline on a cron schedule and the retrain flow on an interval.

    python -m flows.deploy [--params params.yaml]

serves both from this process (`prefect.serve`): it needs a Prefect API, so start one first
(`prefect server start`, UI at http://127.0.0.1:4200) and set PREFECT_API_URL. Schedules come from
`retrain.pipeline_cron` and `retrain.retrain_interval_minutes` in params.yaml. For a work pool
instead: `prefect work-pool create anomaly --type process`, `prefect worker start --pool anomaly`,
and `deployments(...)[i].apply()` with `work_pool_name="anomaly"`.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from prefect import serve

from anomaly_models.config import load_params
from flows.pipeline import pipeline
from flows.retrain import retrain


def deployments(params_file: str = "params.yaml", profile: str | None = None) -> list:
    params = load_params(params_file, profile)
    arguments = {"params_file": params_file, "profile": profile}
    return [
        pipeline.to_deployment(
            name="scheduled-pipeline", cron=params.retrain.pipeline_cron, parameters=arguments
        ),
        retrain.to_deployment(
            name="retrain-on-new-data",
            interval=timedelta(minutes=params.retrain.retrain_interval_minutes),
            parameters=arguments,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="serve the scheduled pipeline and retrain flows")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile")
    args = parser.parse_args(argv)
    serve(*deployments(args.params, args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
