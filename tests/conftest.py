"""Shared fixtures: a small exported repository, the trained zoo, and real server processes on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    PROJECT,
    ServerProcess,
    free_port,
    running_server,
    serve_config,
    stop_process_group,
    wait_serving,
)


def export_random_translator(repo: Path, name: str, *, max_new_tokens: int, max_len: int = 48, d_model: int = 16,
                             torch_checkpoint: bool = True, languages: dict[str, str] | None = None) -> None:
    """A randomly initialised translator (one layer each side) over the numbers tokenizer, exported as entry
    ``name`` of ``repo``; seed torch before calling for fixed weights."""
    from transerve.export.exporter import ExportOptions, export_translator_entry
    from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
    from transerve.models.zoo.numbers import train_tokenizer
    from transerve.models.zoo.numbers_data import NumbersDataConfig, make_split

    train, _ = make_split(NumbersDataConfig(cardinals=300, ordinals=50, test_cardinals=5, test_ordinals=5,
                                            test_years=2))
    tokenizer = train_tokenizer([t for pair in train for t in pair], 60)
    mt = Seq2SeqTransformer(TransformerConfig(vocab_size=tokenizer.get_vocab_size(), d_model=d_model, num_heads=2,
                                              num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, dropout=0.0,
                                              max_len=max_len)).eval()
    export_translator_entry(mt, tokenizer, ExportOptions(repo, name, default=True, torch_checkpoint=torch_checkpoint,
                                                         languages=languages), max_new_tokens=max_new_tokens)


@pytest.fixture(scope="session")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT (batch norm) and a translator with random weights, exported like any model."""
    from transerve.export.exporter import ExportOptions, export_vit_entry
    from transerve.models.vit import ViT, ViTConfig

    repo = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=2, num_heads=2, norm="batch")).eval()
    export_vit_entry(vit, ExportOptions(repo, "tiny-vit", default=True, torch_checkpoint=True),
                     labels=[f"class-{i}" for i in range(10)],
                     preprocessing={"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "resample": "bilinear"})
    export_random_translator(repo, "tiny-mt", max_new_tokens=16, languages={"source": "en", "target": "de"})
    return repo


@pytest.fixture(scope="session")
def long_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random translator that never emits EOS within its 200-token budget: long, mixed-length decodes."""
    import yaml

    repo = tmp_path_factory.mktemp("long-repo")
    torch.manual_seed(1)
    export_random_translator(repo, "long-mt", max_new_tokens=200, max_len=256)
    config_file = repo / "long-mt" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["scheduler"].update(max_active_sequences=128, max_cached_tokens=128 * 256)  # room for 100 streams
    config_file.write_text(yaml.safe_dump(config))
    return repo


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real demo zoo, trained once per test session (minutes: only slow tests use it)."""
    from transerve.cli import app
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("zoo")
    result = CliRunner().invoke(app, ["zoo", "build", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def zoo_repo(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo exported into a model repository (with int8 variants), as `make serve` builds it."""
    from transerve.export.zoo import export_zoo

    repo = tmp_path_factory.mktemp("zoo-repo")
    export_zoo(zoo_dir, repo, int8=True, on_status=lambda message: None)
    return repo


# what a wheel is built from
SOURCES = ("pyproject.toml", "README.md", "common", "cli", "models", "export", "server", "clients")


@pytest.fixture(scope="session")
def installed_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a new virtual environment where transerve and transerve-client are installed from
    wheels — not editable, as the container image and Ray workers install them. Its other dependencies are
    borrowed from this environment through a path entry (a ``.pth`` line: this environment's own ``.pth`` files,
    among them the editable install's import hook, are not run), so only the two packages under test are new."""
    import sysconfig

    root = tmp_path_factory.mktemp("installed")
    source, wheels, venv = root / "source", root / "wheels", root / "venv"
    source.mkdir()
    for name in SOURCES:  # built from a copy: setuptools' build/ folder stays out of the checkout
        if (PROJECT / name).is_dir():
            shutil.copytree(PROJECT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(PROJECT / name, source / name)
    quiet = {"check": True, "capture_output": True, "text": True}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(source / "clients"), str(source)], **quiet)  # type: ignore[call-overload]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **quiet)  # type: ignore[call-overload]
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          **quiet).stdout.strip()  # type: ignore[call-overload]
    (Path(site) / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    *map(str, sorted(wheels.glob("*.whl")))], **quiet)  # type: ignore[call-overload]
    return python


@pytest.fixture(scope="module")
def server(small_repo: Path) -> Iterator[ServerProcess]:
    with running_server(small_repo) as proc:
        yield proc


@pytest.fixture(scope="module")
def ray_address(zoo_repo: Path, installed_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``serve run deploy/ray/serve.yaml`` from the project root, as the README says, against the package
    installed from wheels (not editable): Ray builds the application in its own worker processes, which import
    ``transerve.server.edge.ray_serve`` with the project root on their path. The file's two ports are moved to
    free ones; the replicas (2, its autoscaling floor) and everything else are the file's."""
    port = free_port()
    config_file = tmp_path_factory.mktemp("ray") / "serve.yaml"
    config_file.write_text(yaml.safe_dump(serve_config(port, free_port())))
    # fp32: dynamic int8 scales activations per batch, so its answers move with batch composition, which
    # differs between one server and two replicas (see README, "Which precision serves")
    env = {**os.environ, "TRANSERVE_REPO": str(zoo_repo), "TRANSERVE_PRECISION": "fp32",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "PYTHONUNBUFFERED": "1"}
    log = config_file.with_suffix(".log").open("w")
    serve_run = [str(installed_python), "-c", "import sys; from ray.serve.scripts import cli; sys.exit(cli())",
                 "run", str(config_file)]
    process = subprocess.Popen(serve_run, cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_serving(f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
    finally:
        stop_process_group(process)
        log.close()
