"""Hatch build hook: generate the gRPC stubs from protos/heed/v1/*.proto into heed/v1/.

The .proto files are the contract; the stubs are a build product (git-ignored, never edited).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # imported outside a build (e.g. by the test that checks the stubs are current)
    BuildHookInterface = object  # type: ignore[assignment,misc]


def generate(root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every .proto under protos/; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    protos = root / "protos"
    sources = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{protos}",
        f"-I{include}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources}")
    out = root / "heed" / "v1"
    (out / "__init__.py").write_text('"""Generated from protos/heed/v1 at build time; do not edit."""\n')
    return sorted(out.glob("*.py*"))


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        written = generate(Path(self.root))
        if version == "editable":  # the source tree itself is on the path
            return
        build_data.setdefault("force_include", {})
        for path in written:
            build_data["force_include"][str(path)] = str(path.relative_to(self.root))
