"""The shipped deployment files, checked against the libraries that read them (there is no cluster here).

- deploy/helm/values.yaml: every Kubernetes object (env, volumes, volume mounts, resources) through the Kubernetes
  client's models, strictly (dagster-k8s's ``k8s_model_from_dict``: unknown keys fail), which is what the chart
  renders them into; the user deployment's gRPC arguments load the code location; the PostgreSQL settings make a
  dagster-postgres storage config that dagster's instance schema accepts.
- The embedding step's ``dagster-k8s/config`` tag through dagster-k8s's own parser and the container model.
- Dockerfile: the interpreter matches ``requires-python``, the torch pin matches the Makefile's, the command
  serves the module the Helm values name.
The chart's own values.schema.json is not installable offline (it ships with the chart, not with a Python
package), so the chart-level keys are checked only by the structure the chart's templates read.
"""

import dataclasses
import re
import tomllib

import kubernetes
import pytest
import yaml
from dagster import AssetKey
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config_schema
from dagster_k8s.job import UserDefinedDagsterK8sConfig
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

from paper_assets.definitions import build_definitions
from paper_assets.defs.executor import K8S_CONFIG_TAG, K8S_GPU_STEP
from paper_assets.engine.home import LOCAL_HOME_ENV, ProjectHome
from paper_assets.settings import Settings

from .conftest import REPO

VALUES = REPO / "deploy" / "helm" / "values.yaml"


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(VALUES.read_text(encoding="utf-8"))


def _k8s(model, data):
    """A Kubernetes object as written in YAML (camelCase, as the chart passes it on) into the client's model."""
    return k8s_model_from_dict(model, k8s_snake_case_dict(model, data))


def test_helm_values_kubernetes_objects_are_valid(values):
    deployments = values["dagster-user-deployments"]["deployments"]
    assert values["dagster-user-deployments"]["enabled"] and len(deployments) == 1
    deployment = deployments[0]
    env = [_k8s(kubernetes.client.V1EnvVar, item) for item in deployment["env"]]
    names = {item.name for item in env}
    assert {"PAPER_ASSETS_HOME", "PAPER_ASSETS_EXECUTOR", LOCAL_HOME_ENV} <= names
    settings = set(Settings.__dataclass_fields__)
    ours = {name for name in names if name.startswith("PAPER_ASSETS_") and name != LOCAL_HOME_ENV}
    assert all(name.removeprefix("PAPER_ASSETS_").lower() in settings for name in ours), "every variable is a setting"
    assert names - ours - {LOCAL_HOME_ENV} <= {"AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"}  # botocore's own
    home = ProjectHome(next(e.value for e in env if e.name == "PAPER_ASSETS_HOME"), local="/tmp/x")
    assert home.remote and home.root.protocol == "s3"  # the shared home is an S3 prefix: no volume to mount
    for place in (deployment, values["runLauncher"]["config"]["k8sRunLauncher"]):
        assert "volumes" not in place and "volumeMounts" not in place
        assert [s["name"] for s in place["envSecrets"]] == ["paper-assets-secrets"]
    _k8s(kubernetes.client.V1ResourceRequirements, deployment["resources"])
    with pytest.raises(Exception, match="Unexpected keys"):  # noqa: B017 - strict: a misspelt key fails
        _k8s(kubernetes.client.V1VolumeMount, {"name": "home", "mountpath": "/data"})
    assert values["runLauncher"]["type"] == "K8sRunLauncher"


def test_helm_values_grpc_args_serve_our_code_location(values):
    args = values["dagster-user-deployments"]["deployments"][0]["dagsterApiGrpcArgs"]
    assert args == ["-m", "paper_assets.definitions"]
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert '"-m", "paper_assets.definitions"' in dockerfile


def test_helm_postgresql_settings_make_a_valid_dagster_instance(values):
    pg = values["postgresql"]
    assert pg["enabled"] is False and values["generatePostgresqlPasswordSecret"] is False
    # What the chart's instance template renders from these values (helpers/instance/_postgresql.tpl).
    storage = {"postgres_db": {"username": pg["postgresqlUsername"], "password": {"env": "DAGSTER_PG_PASSWORD"},
                               "hostname": pg["postgresqlHost"], "db_name": pg["postgresqlDatabase"],
                               "port": pg["service"]["port"]}}
    instance = {"storage": {"postgres": storage},
                "run_launcher": {"module": "dagster_k8s.launcher", "class": "K8sRunLauncher", "config": {}}}
    result = validate_config(dagster_instance_config_schema(), instance)
    assert result.success, result.errors


def test_embedding_steps_request_a_gpu_on_kubernetes(tmp_path):
    config = UserDefinedDagsterK8sConfig.from_dict(K8S_GPU_STEP)
    resources = _k8s(kubernetes.client.V1ResourceRequirements, config.container_config["resources"])
    assert resources.limits["nvidia.com/gpu"] == "1"
    defs = build_definitions(Settings(home=str(tmp_path / "home"), source="", executor="k8s"))
    assert defs.executor.name == "k8s"
    graph = defs.resolve_asset_graph()
    tags = graph.get(AssetKey("paper_embeddings")).assets_def.op.tags
    assert tags[K8S_CONFIG_TAG] == K8S_GPU_STEP or yaml.safe_load(tags[K8S_CONFIG_TAG]) == K8S_GPU_STEP
    assert K8S_CONFIG_TAG not in graph.get(AssetKey("papers")).assets_def.op.tags  # CPU steps stay on CPU pods
    with pytest.raises(ValueError, match="PAPER_ASSETS_EXECUTOR"):
        build_definitions(Settings(home=str(tmp_path / "home"), source="", executor="slurm"))


def test_dockerfile_matches_the_project():
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M).group(1)
    assert project["requires-python"] == f">={python}"
    makefile_torch = re.search(r"^TORCH \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f'TORCH_SPEC="{makefile_torch}"' in dockerfile
    extras = re.search(r'pip install --no-cache-dir "\.\[([a-z0-9,]+)\]"', dockerfile).group(1).split(",")
    assert set(extras) == {"k8s", "s3"} <= set(project["optional-dependencies"])
    for copied in re.findall(r"^COPY (.+) \./", dockerfile, re.M):
        for name in copied.split():
            assert (REPO / name).exists(), name


def test_the_configuration_reference_is_generated_from_the_settings():
    """docs/configuration.md is what tools/write_configuration_doc.py writes today; every setting and every variable
    read elsewhere is in it."""
    from paper_assets.settings import OTHER_VARIABLES, Settings, configuration_document, variable

    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert text == configuration_document(), "run: .venv/bin/python tools/write_configuration_doc.py"
    for spec in dataclasses.fields(Settings):
        assert f"`{variable(spec.name)}`" in text
    for name, _, _ in OTHER_VARIABLES:
        assert f"`{name}`" in text


def test_every_settings_variable_is_read_through_the_settings():
    """No module but settings.py reads or sets a settings variable by its literal name (a string that is exactly
    the name, or a keyword argument): each is declared once. Messages that name a variable for the user are fine."""
    import ast

    from paper_assets.settings import Settings, variable

    names = {variable(spec.name) for spec in dataclasses.fields(Settings)}
    for path in sorted((REPO / "paper_assets").rglob("*.py")):
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            literal = node.value if isinstance(node, ast.Constant) else node.arg if isinstance(node, ast.keyword) \
                else None
            assert literal not in names, f"{path.relative_to(REPO)}:{node.lineno}: {literal}: use settings.variable()"


def test_dagster_steps_compile_the_model_only_on_long_lived_workers(tmp_path):
    """compile=auto: a step per process (multiprocess, k8s) would pay the compilation for every partition; Celery
    workers keep the compiled model across steps. An explicit setting is taken as given."""
    from paper_assets.definitions import build_resources
    from paper_assets.settings import Settings

    def compile_of(**kw):
        return build_resources(Settings(home=str(tmp_path), source="", **kw))["specter2"].compile

    assert compile_of() == "off" and compile_of(executor="k8s") == "off"
    assert compile_of(celery_broker="redis://127.0.0.1:6379/0") == "auto"
    assert compile_of(executor="celery", celery_broker="redis://127.0.0.1:6379/0") == "auto"
    assert compile_of(compile="on") == "on" and compile_of(compile="off", celery_broker="redis://x:6379/0") == "off"


def test_celery_runs_hand_a_finished_step_on_within_a_tenth_of_a_second():
    """dagster-celery's coordinator polls its steps every TICK_SECONDS (1 s by default): the executor the project
    configures polls every COORDINATOR_POLL_SECONDS."""
    import dagster_celery.core_execution_loop as coordinator_loop

    from paper_assets.defs.executor import COORDINATOR_POLL_SECONDS, executor_for
    from paper_assets.settings import Settings

    coordinator_loop.TICK_SECONDS = 1
    executor = executor_for(Settings(home="", source="", executor="celery", celery_broker="redis://127.0.0.1:6379/0"))
    assert executor.name == "celery_workers"
    assert coordinator_loop.TICK_SECONDS == COORDINATOR_POLL_SECONDS <= 0.1
