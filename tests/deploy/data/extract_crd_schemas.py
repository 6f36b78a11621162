"""Extract the served v1 openAPIV3Schema of KubeRay's RayService and RayCluster CRDs into small JSON files
(field descriptions dropped: they are most of the ~1 MB of each CRD).

    .venv/bin/python tests/deploy/data/extract_crd_schemas.py /path/to/kuberay/helm-chart/kuberay-operator/crds
"""
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def without_descriptions(node):
    """The schema minus `description` keywords (a property *named* description is a dict, and stays)."""
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def main(crd_dir: Path) -> None:
    for kind, filename in CRDS.items():
        crd = yaml.safe_load((crd_dir / filename).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
        schema = without_descriptions(version["schema"]["openAPIV3Schema"])
        out = HERE / f"{kind.lower()}.v1.schema.json"
        out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{out.name}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/kuberay-crds"))
