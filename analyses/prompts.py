"""Default prompt sets for the Section 2 studies, and loaders for the benchmark prompts used by the
geometry figures (ZsRE and the hallucination set in ``shared/data``).

Everything here is an immutable tuple: configs hold these as defaults without copying.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Short factual statements (one fact each) used by the sparsity / masking / mutex studies.
KNOWLEDGE_PROMPTS: tuple[str, ...] = (
    "Paris is the capital of France",
    "Berlin is the capital of Germany",
    "Tokyo is the capital of Japan",
    "The Nile is the longest river in Africa",
    "Mount Everest is the highest mountain on Earth",
    "Water boils at 100 degrees Celsius at sea level",
    "The chemical symbol for gold is Au",
    "Light travels faster than sound",
    "The Earth orbits the Sun once every year",
    "The Moon orbits the Earth",
    "Bananas contain high amounts of potassium",
    "Spinach is a rich source of iron",
    "Honey bees make honey from flower nectar",
    "Whales are mammals that live in the ocean",
    "Penguins live mostly in the Southern Hemisphere",
    "William Shakespeare wrote the play Hamlet",
    "Leonardo da Vinci painted the Mona Lisa",
    "Albert Einstein developed the theory of relativity",
    "Isaac Newton formulated the laws of motion",
    "Marie Curie won two Nobel Prizes",
    "The Great Wall is located in China",
    "The Amazon rainforest is in South America",
    "Mozart was a composer from Austria",
    "The piano has eighty-eight keys",
    "A week has seven days",
    "The human heart has four chambers",
    "DNA carries genetic information",
    "Oxygen is needed for fire to burn",
    "The Pacific is the largest ocean",
    "Football is played with a round ball",
)

#: Unrelated, non-factual inputs: the default "locality" side of the geometry study.
LOCALITY_PROMPTS: tuple[str, ...] = (
    "Can you help me write an email to my landlord?",
    "I had pasta for dinner last night",
    "Please sort these numbers from small to large",
    "What should I wear to a wedding in summer?",
    "My cat likes to sleep on the sofa",
    "Turn left at the next traffic light",
    "Remember to buy milk and eggs",
    "The meeting has been moved to Thursday",
    "How do I reset my password?",
    "She laughed at the joke for a long time",
    "Let's go for a walk after lunch",
    "The printer on the second floor is broken",
    "Write a short poem about autumn leaves",
    "I think it will rain this afternoon",
    "Could you repeat that more slowly?",
    "He forgot his umbrella on the bus",
    "Count from one to ten",
    "The kids are playing in the garden",
    "Thanks for your help yesterday",
    "Please close the window, it is cold",
    "We are out of coffee again",
    "Translate good morning into Spanish",
    "The movie starts at eight o'clock",
    "I need to charge my phone",
    "Summarise this paragraph in one sentence",
    "Our team won the match on Sunday",
    "The soup needs a little more salt",
    "Don't forget to water the plants",
    "Tell me a fun fact",
    "My keyboard is missing a key",
)

#: Knowledge statements for the entanglement study: two per topic (same topic = related pair). The
#: first and third are the paper's example of an unrelated pair.
ENTANGLEMENT_STATEMENTS: tuple[str, ...] = (
    "Bananas contain high amounts of potassium",
    "Spinach is a rich source of iron",
    "The Sun revolves around the Earth in geocentric models",
    "The Earth orbits the Sun once every year",
    "Paris is the capital of France",
    "Berlin is the capital of Germany",
    "Water boils at 100 degrees Celsius at sea level",
    "Ice melts at zero degrees Celsius",
    "William Shakespeare wrote the play Hamlet",
    "Jane Austen wrote the novel Pride and Prejudice",
)
ENTANGLEMENT_TOPICS: tuple[str, ...] = (
    "nutrition", "nutrition",
    "astronomy", "astronomy",
    "capitals", "capitals",
    "temperature", "temperature",
    "literature", "literature",
)


def data_root() -> Path:
    """The benchmark data folder: ``$MICROEDIT_DATA`` or ``<workspace>/shared/data`` (the layout the
    tests use: ``shared/`` next to the repository checkout)."""
    env = os.environ.get("MICROEDIT_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _load_records(path: Path) -> list[dict[str, object]]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path} does not hold a JSON list of records")
    return records


def _field_pairs(records: list[dict[str, object]], edit_key: str, loc_key: str, n: int, path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    edit: list[str] = []
    loc: list[str] = []
    for rec in records[:n]:
        e, lo = rec.get(edit_key), rec.get(loc_key)
        if not isinstance(e, str) or not isinstance(lo, str):
            raise ValueError(f"{path}: a record lacks string fields '{edit_key}'/'{loc_key}'")
        edit.append(e)
        loc.append(lo)
    return tuple(edit), tuple(loc)


def zsre_edit_locality(path: str | os.PathLike[str] | None = None, n: int = 200) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ZsRE edit prompts (``src``) and locality prompts (``loc``) of the first ``n`` records."""
    p = Path(path) if path is not None else data_root() / "zsre" / "zsre_mend_eval_portability_gpt4.json"
    return _field_pairs(_load_records(p), "src", "loc", n, p)


def hallucination_edit_locality(path: str | os.PathLike[str] | None = None, n: int = 200) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Hallucination-set edit prompts (``prompt``) and locality prompts (``locality_prompt``) of the
    first ``n`` records. These are long passages: the geometry study truncates them to its
    ``max_tokens``."""
    p = Path(path) if path is not None else data_root() / "hallucination" / "hallucination-edit.json"
    return _field_pairs(_load_records(p), "prompt", "locality_prompt", n, p)
