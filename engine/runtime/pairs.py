"""Known target / DFlash draft pairs from configs/pairs.toml."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from engine.runtime.config import config_dir, tomllib

# engine.model.loader.EMBEDDED_MODEL_ID, not imported: --list-configs loads no MLX
EMBEDDED_ID = "SmolLM2-135M-Instruct"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # holds engine/, so shipped draft paths resolve in a wheel too


@dataclass(frozen=True)
class KnownPair:
    name: str
    target: str
    draft: str
    note: str = ""

    @property
    def draft_spec(self) -> str:
        """A repo-relative path (a shipped draft) becomes absolute; hub ids stay as they are."""
        local = PACKAGE_ROOT / self.draft
        return str(local) if self.draft.startswith("engine/") else self.draft


def load_pairs(path: Path | None = None) -> dict[str, KnownPair]:
    path = path or (config_dir() / "pairs.toml" if config_dir() else None)
    if path is None or not path.is_file():
        return {}
    with open(path, "rb") as f:
        data = tomllib.load(f)
    known = {f.name for f in fields(KnownPair)} - {"name"}
    pairs = {}
    for name, entry in data.items():
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in pair {name!r} of {path}")
        pairs[name] = KnownPair(name=name, **entry)
    return pairs


def default_draft_for(target: str, model_id: str) -> str | None:
    """The draft listed for a target, matched by the model spec or the loaded model's id."""
    for pair in load_pairs().values():
        if pair.target in (target, model_id) or (pair.target == "embedded" and is_embedded_model(model_id)):
            return pair.draft_spec
    return None


def is_embedded_model(model_id: str) -> bool:
    """SmolLM2-135M-Instruct however it was loaded: the embedded GGUF's own file elsewhere
    (`SmolLM2-135M-Instruct.Q4_1`) or another quantization of it takes the embedded draft too."""
    return model_id.split(".")[0].lower() == EMBEDDED_ID.lower()


def describe_pairs() -> str:
    rows = [f"{'name':<22} {'target':<48} draft"]
    for p in load_pairs().values():
        rows.append(f"{p.name:<22} {p.target:<48} {p.draft}" + (f"\n{'':<22} {p.note}" if p.note else ""))
    return "\n".join(rows)
