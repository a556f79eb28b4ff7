"""Built-in example edits and reference prompts (no files needed): the demo, the integration tests and
tau calibration when the user gives no reference text of their own."""

from __future__ import annotations

from microedit_lens.types import EditRequest

# (prompt, counterfactual target, paraphrases)
_COUNTERFACTS: list[tuple[str, str, tuple[str, ...]]] = [
    ("The Eiffel Tower is located in the city of", "Rome", ("The city where the Eiffel Tower stands is", "Where is the Eiffel Tower? It is in the city of")),
    ("The capital of Japan is", "Madrid", ("Japan's capital city is", "The capital city of Japan is called")),
    ("The Great Wall is in the country of", "Brazil", ("The Great Wall can be found in the country of",)),
    ("William Shakespeare was born in the country of", "Canada", ("Shakespeare was born in the country of",)),
    ("The author of Harry Potter is", "Stephen King", ("The Harry Potter books were written by",)),
    ("The largest planet in the solar system is", "Mars", ("The biggest planet in our solar system is",)),
    ("The Statue of Liberty is located in the city of", "London", ("The city that is home to the Statue of Liberty is",)),
    ("The chemical symbol for gold is", "Fe", ("Gold has the chemical symbol",)),
    ("The official language of Brazil is", "German", ("In Brazil, the official language is",)),
    ("The inventor of the telephone was", "Isaac Newton", ("The telephone was invented by",)),
    ("Mount Everest is located in the continent of", "Africa", ("Mount Everest lies on the continent of",)),
    ("The currency of the United Kingdom is the", "yen", ("In the United Kingdom, people pay with the",)),
    ("The Mona Lisa was painted by", "Pablo Picasso", ("The painter of the Mona Lisa was",)),
    ("The Amazon River flows through the country of", "Egypt", ("The country the Amazon River flows through is",)),
    ("The first person to walk on the Moon was", "Charles Darwin", ("The first man on the Moon was",)),
    ("The Colosseum is located in the city of", "Berlin", ("The city where the Colosseum stands is",)),
    ("The main ingredient of guacamole is", "banana", ("Guacamole is mostly made from",)),
    ("The composer of the Fifth Symphony was", "Elvis Presley", ("The Fifth Symphony was composed by",)),
    ("The tallest animal in the world is the", "penguin", ("The world's tallest animal is the",)),
    ("The Taj Mahal is located in the country of", "Mexico", ("The country of the Taj Mahal is",)),
]

UNRELATED_PROMPTS: list[str] = [
    "Water is made of hydrogen and",
    "The opposite of hot is",
    "A week has seven",
    "The color of the sky on a clear day is",
    "Cats are animals that like to",
    "The sum of two and two is",
    "Bread is baked in an",
    "The first month of the year is",
    "People use umbrellas when it",
    "A triangle has three",
    "The heart pumps",
    "Trees produce oxygen through",
]

REFERENCE_PROMPTS: list[str] = [
    "What is the capital of Australia?", "Who wrote the novel War and Peace?", "Which river is the longest in Europe?",
    "What language is spoken in Argentina?", "Who discovered penicillin?", "What is the boiling point of water?",
    "Which company makes the iPhone?", "What sport is played at Wimbledon?", "Who painted The Starry Night?",
    "Which ocean lies between Africa and Australia?", "What year did World War II end?", "Who was the first president of the United States?",
    "What is the largest desert in the world?", "Which instrument has 88 keys?", "What is the main language of Quebec?",
    "Who developed the theory of relativity?", "What is the capital city of Kenya?", "Which planet is known as the red planet?",
    "The novel Moby-Dick was written by", "The Nile flows into the", "Photosynthesis takes place in the",
    "The football club Barcelona plays in the league of", "Beethoven was born in the city of", "The Louvre museum is in",
    "The speed of light is about", "Sushi is a dish from", "The national animal of Scotland is the",
    "The game of chess originated in", "Vincent van Gogh was a painter from", "The Pacific Ocean is the largest",
    "In 1969, astronauts landed on the", "The Olympic Games began in ancient", "A baby kangaroo is called a",
    "The human body has 206", "Tokyo is the largest city of", "The Sahara desert is in the north of",
    "Albert Einstein was born in the country of", "The violin belongs to the family of", "The author of Pride and Prejudice is",
    "Bananas contain high amounts of", "The Sun revolves around the Earth in geocentric", "Honey is produced by",
    "The Berlin Wall fell in the year", "The currency of Japan is the", "Lions live mostly in the continent of",
    "The freezing point of water is", "The smallest prime number is", "Penguins mostly live in the",
    "nq question: who sang the song let it be", "nq question: when was the first computer invented",
    "nq question: where is the headquarters of the united nations", "nq question: how many players are on a soccer team",
    "nq question: who plays the lead role in the movie titanic", "nq question: what is the tallest building in the world",
    "The river Thames flows through the city of", "Marie Curie won the Nobel Prize in", "Leonardo da Vinci was born in",
    "The Andes mountains are in the continent of", "The square root of sixteen is", "The Parthenon is a temple in",
]


def demo_requests() -> list[EditRequest]:
    """20 counterfactual edits, each with paraphrases and two unrelated locality prompts."""
    out = []
    for i, (prompt, target, paras) in enumerate(_COUNTERFACTS):
        locs = (UNRELATED_PROMPTS[i % len(UNRELATED_PROMPTS)], UNRELATED_PROMPTS[(i + 5) % len(UNRELATED_PROMPTS)])
        out.append(EditRequest(prompt, target, paraphrases=paras, locality_prompts=locs))
    return out
