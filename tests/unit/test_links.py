"""Links into the MLflow UI open its classic views: MLflow 3 shows the GenAI view unless the URL says otherwise."""

from research.ui import experiment_url, run_url

CLASSIC = "?workflowType=machine_learning"


def test_experiment_and_run_links_ask_for_the_classic_view():
    assert experiment_url("http://127.0.0.1:5000/", "3") == f"http://127.0.0.1:5000/#/experiments/3{CLASSIC}"
    assert experiment_url("http://127.0.0.1:5000", None) == f"http://127.0.0.1:5000/#/experiments{CLASSIC}"
    assert run_url("https://mlflow.example.org/", "3", "abc") == f"https://mlflow.example.org/#/experiments/3/runs/abc{CLASSIC}"
    assert run_url("http://h:5000", "3", "abc", "artifacts/summary.html") == f"http://h:5000/#/experiments/3/runs/abc/artifacts/summary.html{CLASSIC}"
