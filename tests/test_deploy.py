"""The deployment files in deploy/ stay true to the code.

- every ``dbpool`` command line they run (the Dockerfile's command and
  health check, the Kubernetes container command, probes and preStop hook)
  parses with the CLI as it is;
- the Dockerfile copies everything the package's build reads;
- the TOML they ship (deploy/dbpool.toml, the ConfigMap's) loads;
- the Kubernetes manifests validate against the Kubernetes schemas, offline
  (kubernetes-validate, also run by CI), and the YAML lints clean (yamllint).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from dbpool.cli import build_parser
from dbpool.server.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def dockerfile_commands() -> list[list[str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [json.loads(match) for match in re.findall(r"CMD (\[.*?\])", text)]


def manifest_commands() -> list[list[str]]:
    commands: list[list[str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "command" and isinstance(value, list):
                    commands.append([str(part) for part in value])
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            walk(document)
    return commands


def test_there_are_commands_to_check() -> None:
    assert len(dockerfile_commands()) == 2
    assert len(manifest_commands()) == 3


@pytest.mark.parametrize("command", dockerfile_commands() + manifest_commands(),
                         ids=lambda command: " ".join(command[:3]))
def test_every_dbpool_command_line_parses(command: list[str]) -> None:
    assert command[0] == "dbpool"
    args = build_parser().parse_args(command[1:])  # an unknown flag exits 2 here
    assert isinstance(args, argparse.Namespace)


def test_the_dockerfile_copies_what_the_build_reads() -> None:
    """The image is built from the files the Dockerfile copies: the build backend
    and its setup.py, the metadata, and every folder a package is mapped to."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "README.md", "setup.py",
              *project["build-system"]["backend-path"],
              *(folder.split("/")[0]
                for folder in project["tool"]["setuptools"]["package-dir"].values())}
    text = (DEPLOY / "Dockerfile").read_text()
    copied = {source.rstrip("/") for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE)
              for source in line.split()[:-1]}
    assert needed <= copied, f"the Dockerfile does not copy {sorted(needed - copied)}"


def test_the_shipped_configurations_load(tmp_path: Path) -> None:
    config = load_config(argparse.Namespace(config=str(DEPLOY / "dbpool.toml")), {})
    assert config.curve and config.clients["ops"].admin
    for document in yaml.safe_load_all((DEPLOY / "kubernetes" / "configmap.yaml").read_text()):
        path = tmp_path / "dbpool.toml"
        path.write_text(document["data"]["dbpool.toml"])
        shipped = load_config(argparse.Namespace(config=str(path)), {})
        assert shipped.metrics_bind == "0.0.0.0:9187" and shipped.curve
        assert shipped.grace < 60  # the Deployment's terminationGracePeriodSeconds


def test_the_manifests_validate_against_the_kubernetes_schemas() -> None:
    done = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict",
                           *map(str, MANIFESTS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(MANIFESTS)


def test_the_yaml_lints_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "yamllint", "-c",
                           str(ROOT / ".yamllint.yaml"), str(DEPLOY)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
