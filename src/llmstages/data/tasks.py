"""The built-in task sets of the default pipeline: questions with checkable answers, and preference pairs.

Three tasks, each row tagged with its ``task``:

``arithmetic``
    "What's a + b?" / "What's a - b?" (``a >= b``) for operands ``0..arithmetic_max``, answer the decimal
    result. Preference pairs reject plausible slips (:func:`arith_slips`). Small training sums are repeated in
    the SFT set (:data:`SMALL_SUM_COPIES`). Its training questions are also
    written as plain text into the default pretraining corpus (:func:`arithmetic_documents`), so that the
    pretrained model has seen sums before it is taught to answer in the chat format.
``docstring``
    "What does json.dumps do?", answer the first sentence of the docstring. Pairs reject another answer.
``explain``
    "Explain gravity to a 5-year-old." and two other phrasings, over :data:`EXPLAIN_TOPICS`. Each topic has a
    simple answer a child can follow and a technical one; the preference pairs prefer the simple one, while
    the SFT set gives each prompt mostly the technical one (:data:`EXPLAIN_SFT_SIMPLE` against
    :data:`EXPLAIN_SFT_TECHNICAL` copies; real instruction data mixes styles), so that preference learning (reward model, then RLHF) is what moves the model towards the simple,
    helpful answer.
    Prompts are split by topic: held-out topics are never seen in training.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections.abc import Iterator

DOC_MODULES = (
    "base64", "bisect", "calendar", "collections", "colorsys", "copy", "difflib", "fnmatch",
    "functools", "glob", "hashlib", "heapq", "html", "itertools", "json", "keyword", "math",
    "operator", "os.path", "random", "re", "secrets", "shlex", "shutil", "statistics", "string",
    "struct", "textwrap", "urllib.parse", "uuid", "zlib",
)
ARITH_PROMPT = re.compile(r"What's (\d+) ([+-]) (\d+)\?")
#: Training sums whose operands are both at most ``SMALL_OPERAND`` appear ``SMALL_SUM_COPIES`` times in the SFT set:
#: they are 4% of the questions but most of what a person asks ("What's 2 + 2?"), and with one copy the model
#: answered them less reliably than two-digit sums.
SMALL_OPERAND, SMALL_SUM_COPIES = 20, 4
TASKS = ("arithmetic", "docstring", "explain")


# --------------------------------------------------------------------------- arithmetic
def arithmetic_qa(max_n: int) -> list[tuple[str, str]]:
    """``("What's a op b?", answer)`` for a, b in 0..max_n, op in "+", "-" (a >= b for "-")."""
    qa = []
    for a in range(max_n + 1):
        for b in range(max_n + 1):
            qa.append((f"What's {a} + {b}?", str(a + b)))
            if a >= b:
                qa.append((f"What's {a} - {b}?", str(a - b)))
    return qa


def is_small_sum(prompt: str) -> bool:
    """Whether both operands of an arithmetic question are at most :data:`SMALL_OPERAND`."""
    m = ARITH_PROMPT.fullmatch(prompt)
    return bool(m) and max(int(m.group(1)), int(m.group(3))) <= SMALL_OPERAND


def arith_slips(prompt: str, answer: str) -> dict[str, list[int]]:
    """Plausible wrong answers to an arithmetic question, by kind of slip.

    ``carry`` (a carry dropped or added: ±10), ``transposed`` (the answer's two digits swapped),
    ``operation`` (the other operation applied), ``off_by_one`` (±1). Only non-negative values that differ
    from the answer are kept.
    """
    a, op, b = ARITH_PROMPT.fullmatch(prompt).groups()
    a, b, x = int(a), int(b), int(answer)
    slips = {"carry": [x + 10, x - 10], "transposed": [int(str(x)[::-1])] if len(str(x)) == 2 else [],
             "operation": [a - b if op == "+" else a + b], "off_by_one": [x + 1, x - 1]}
    return {k: [v for v in vals if v >= 0 and v != x] for k, vals in slips.items()}


def arith_rejects(prompt: str, answer: str, seed: int, k: int = 2) -> list[str]:
    """``k`` distinct plausible wrong answers of different slip kinds (:func:`arith_slips`), seeded per question.

    Carry, transposition and operation slips come first (in a seeded order); off-by-one only fills in when
    fewer than ``k`` of those apply.
    """
    rng = random.Random(f"{seed}:{prompt}")
    slips = arith_slips(prompt, answer)
    kinds = [kd for kd in ("carry", "transposed", "operation") if slips[kd]]
    rng.shuffle(kinds)
    out: list[int] = []
    for kind in [*kinds, "off_by_one", "off_by_one"]:
        options = [v for v in slips[kind] if v not in out]
        if options and len(out) < k:
            out.append(rng.choice(options))
    return [str(v) for v in out]


ARITHMETIC_LINES_PER_DOC = 256


def arithmetic_documents(rows: list[dict], passes: int, seed: int,
                         lines_per_doc: int = ARITHMETIC_LINES_PER_DOC) -> Iterator[str]:
    """Plain-text documents of solved arithmetic questions for the pretraining corpus.

    Each line is ``"What's 23 + 45? 68"``; every question of ``rows`` (``{"prompt", "answer"}``) appears once per
    pass, in a seeded order that differs per pass, ``lines_per_doc`` lines to a document.
    """
    rng = random.Random(f"{seed}:arithmetic-corpus")
    lines = [f"{r['prompt']} {r['answer']}\n" for r in rows]
    for _ in range(passes):
        rng.shuffle(lines)
        for i in range(0, len(lines), lines_per_doc):
            yield "".join(lines[i:i + lines_per_doc])


# --------------------------------------------------------------------------- docstrings
def first_sentence(doc: str | None, name: str) -> str | None:
    """First sentence of a docstring's first paragraph (whitespace collapsed), or None.

    None if there is no docstring, the paragraph starts with ``name(`` (a C signature
    line), or the sentence is shorter than 10 / longer than 200 characters.
    """
    if not doc:
        return None
    para = " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())
    if para.startswith(name + "("):
        return None
    m = re.search(r"\.(?=\s|$)", para)
    s = para[: m.end()] if m else para
    return s if 10 <= len(s) <= 200 else None


def docstring_qa(modules: tuple[str, ...] = DOC_MODULES) -> list[tuple[str, str]]:
    """``("What does mod.fn do?", first sentence)`` for public documented callables, sorted.

    Skips aliases (``obj.__name__ != name``) and classes without a docstring of their own.
    """
    qa = []
    for modname in sorted(modules):
        mod = importlib.import_module(modname)
        names = getattr(mod, "__all__", None) or dir(mod)
        for name in sorted(set(names)):
            obj = getattr(mod, name, None)
            if name.startswith("_") or obj is None or inspect.ismodule(obj) or not callable(obj):
                continue
            if getattr(obj, "__name__", name) != name:  # alias (bisect.bisect) or bound builtin
                continue
            if inspect.isclass(obj) and vars(obj).get("__doc__") in (None, "An enumeration."):
                continue  # docstring inherited from a base class
            s = first_sentence(inspect.getdoc(obj), name)
            if s:
                qa.append((f"What does {modname}.{name} do?", s))
    return qa


# --------------------------------------------------------------------------- explain simply
EXPLAIN_PROMPTS = ("Explain {} to a 5-year-old.", "How would you explain {} to a child?", "What is {}, in simple words?",
                   "Tell me about {}.", "Can you explain {}?")
#: How often each ``explain`` prompt appears in the SFT set with its simple and with its technical answer: the
#: same question answered in both styles (as by different annotators), so that the SFT model keeps both answers
#: likely (the simple one about 1 in 4) and preference learning can move probability between them. With one
#: answer per prompt (the simple one for a random quarter of the prompts), the model memorised each prompt's one
#: answer and RLHF could not move it within 1 nat of KL (docs/results.md, ablations).
EXPLAIN_SFT_SIMPLE, EXPLAIN_SFT_TECHNICAL = 1, 3

#: ``(topic, simple answer, technical answer)``: the simple one is what the preference data prefers.
EXPLAIN_TOPICS = (
    ("gravity", "Gravity is a pull that makes things fall down, like when you drop your ball and it lands on the floor.",
     "Gravity is the curvature of spacetime produced by mass-energy, described by the Einstein field equations."),
    ("rain", "Rain is water from the clouds. When the clouds get too full and heavy, the water falls down as drops.",
     "Rain is liquid precipitation formed when condensation nuclei grow droplets past the terminal-velocity threshold."),
    ("a rainbow", "A rainbow is sunlight that gets split into all its colors by raindrops, so you see a big colorful bow.",
     "A rainbow is a meteorological phenomenon caused by dispersion and internal reflection of light in water droplets."),
    ("the sun", "The sun is a big, hot ball of fire in the sky. It gives us light in the day and keeps us warm.",
     "The sun is a G-type main-sequence star powered by proton-proton chain nuclear fusion in its core."),
    ("the moon", "The moon is a big rock that goes around the Earth. At night it shines because the sun lights it up.",
     "The moon is Earth's tidally locked natural satellite, whose albedo reflects incident solar radiation."),
    ("a magnet", "A magnet is a special stone or metal that pulls other metal things to it, like a fridge magnet.",
     "A magnet is a material with aligned magnetic dipole moments producing a persistent magnetic field."),
    ("a volcano", "A volcano is a mountain with a hole on top. Sometimes hot, melted rock comes out of it.",
     "A volcano is a rupture in the crust through which magma, tephra and volcanic gases escape from a chamber."),
    ("thunder", "Thunder is the big boom you hear after lightning. The lightning makes the air shake very fast.",
     "Thunder is the acoustic shock wave produced by the rapid thermal expansion of plasma in a lightning channel."),
    ("snow", "Snow is rain that got so cold it turned into tiny pieces of ice that float down softly.",
     "Snow is solid precipitation of ice crystals formed by deposition of water vapor below the freezing point."),
    ("the wind", "Wind is air that moves. You can't see it, but you can feel it push your kite and your hair.",
     "Wind is the bulk movement of air driven by pressure gradients and deflected by the Coriolis effect."),
    ("a seed", "A seed is a tiny baby plant in a little shell. Give it water and sun and it grows into a plant.",
     "A seed is an embryonic plant enclosed in a testa with endosperm reserves that support germination."),
    ("the heart", "Your heart is like a little pump in your chest. It pushes blood all around your body.",
     "The heart is a muscular organ whose myocardial contractions drive systemic and pulmonary circulation."),
    ("sleep", "Sleep is when your body rests so you can grow and feel happy and strong the next day.",
     "Sleep is a recurring state of reduced consciousness regulated by circadian and homeostatic processes."),
    ("a shadow", "A shadow is a dark spot that shows up when you stand in front of a light and block it.",
     "A shadow is a region where an opaque object occludes a light source, forming an umbra and a penumbra."),
    ("the ocean", "The ocean is a giant pool of salty water. Fish and whales live in it, and it has big waves.",
     "The ocean is a body of saline water covering most of the planet, with thermohaline circulation."),
    ("a cloud", "A cloud is a big puff of tiny water drops floating high in the sky, like soft cotton.",
     "A cloud is an aerosol of condensed water droplets or ice crystals suspended in the troposphere."),
    ("electricity", "Electricity is a kind of power that runs in wires and makes lights and toys work.",
     "Electricity is the set of phenomena associated with the flow of charge carriers under a potential difference."),
    ("a plant", "A plant is a living thing that grows in the ground. It drinks water and eats sunlight.",
     "A plant is a multicellular eukaryote that fixes carbon by photosynthesis in its chloroplasts."),
    ("the stars", "Stars are faraway suns. They look tiny because they are very, very far away from us.",
     "Stars are self-gravitating plasma spheres sustained by thermonuclear fusion in hydrostatic equilibrium."),
    ("an echo", "An echo is when you shout and the sound bounces back to you, like a ball off a wall.",
     "An echo is a reflected acoustic wave that arrives with a delay after the direct sound."),
    ("a germ", "A germ is a tiny bug, too small to see, that can make you sick. Washing your hands gets rid of it.",
     "A germ is a pathogenic microorganism, such as a bacterium or virus, capable of causing infection."),
    ("ice", "Ice is water that got very cold and turned hard, like the cubes in your drink.",
     "Ice is the solid phase of water, a hexagonal crystalline lattice stabilised by hydrogen bonding."),
    ("the seasons", "We have seasons because the Earth is tilted, so some months get more sun and are warm, and some are cold.",
     "The seasons arise from the obliquity of Earth's rotational axis relative to its orbital plane."),
    ("a fossil", "A fossil is what is left of a very old animal or plant, turned into stone a long, long time ago.",
     "A fossil is a preserved remnant or trace of an organism mineralised through permineralisation."),
    ("a bird flying", "A bird flies by flapping its wings. The wings push the air down, and that lifts the bird up.",
     "Avian flight relies on aerodynamic lift generated by the wing's airfoil and thrust from flapping kinematics."),
    ("the brain", "Your brain is in your head. It helps you think, remember things and move your body.",
     "The brain is the central organ of the nervous system, composed of neurons communicating via synapses."),
    ("a battery", "A battery is a little box that keeps power inside, so your toys can work without a plug.",
     "A battery is an electrochemical cell converting chemical energy into electrical energy via redox reactions."),
    ("an earthquake", "An earthquake is when the ground shakes because big pieces of the Earth move and bump.",
     "An earthquake is the sudden release of strain energy along a fault, radiating seismic waves."),
    ("a computer", "A computer is a machine that follows steps very fast. It helps us play games and write things.",
     "A computer is a programmable device executing instructions stored in memory on a central processing unit."),
    ("money", "Money is what people use to buy things. You give some money and you get a toy or food.",
     "Money is a medium of exchange, unit of account and store of value whose supply is set by monetary policy."),
    ("the internet", "The internet is a big web that joins computers, so people can send messages and pictures to each other.",
     "The internet is a global network of autonomous systems exchanging packets via the TCP/IP protocol suite."),
    ("a tree", "A tree is a very big plant with a hard trunk and lots of leaves. Birds love to sit in it.",
     "A tree is a perennial woody plant with secondary growth, a lignified trunk and a branching canopy."),
    ("a bee", "A bee is a small buzzy bug that flies from flower to flower and makes sweet honey.",
     "A bee is a hymenopteran insect that forages nectar and pollen and performs entomophilous pollination."),
    ("a dinosaur", "Dinosaurs were giant animals that lived long, long ago, before there were any people.",
     "Dinosaurs were a clade of archosaurian reptiles that dominated terrestrial ecosystems in the Mesozoic era."),
    ("the sky being blue", "The sky looks blue because sunlight bounces around in the air, and the blue light bounces the most.",
     "The sky appears blue because of Rayleigh scattering, whose intensity scales with the inverse fourth power of wavelength."),
    ("a fever", "A fever is when your body gets hot to fight off a germ that is making you sick.",
     "A fever is an elevation of the hypothalamic thermoregulatory set point mediated by pyrogenic cytokines."),
    ("the tide", "The tide is the sea going up and down on the beach. The moon pulls on the water.",
     "Tides are periodic sea-level oscillations caused by the differential gravitational forcing of the moon and sun."),
    ("a map", "A map is a picture of a place from above. It shows you where things are and how to get there.",
     "A map is a scaled symbolic projection of geospatial features onto a plane using a cartographic projection."),
    ("a clock", "A clock tells you what time it is, so you know when it is time to eat or go to bed.",
     "A clock is an instrument that measures time by counting the oscillations of a periodic reference."),
    ("a boat floating", "A boat floats because the water pushes it up. It is light for how big it is.",
     "A boat floats when the buoyant force from displaced water equals its weight, per Archimedes' principle."),
    ("fire", "Fire is very hot light that comes when something burns. It is pretty, but you must not touch it.",
     "Fire is the rapid exothermic oxidation of a fuel in combustion, producing heat, light and reaction products."),
    ("a caterpillar", "A caterpillar is a baby butterfly. It eats lots of leaves, then it sleeps and turns into a butterfly.",
     "A caterpillar is the larval stage of a lepidopteran, which undergoes holometabolous metamorphosis."),
    ("recycling", "Recycling is when we save old bottles and paper so they can be made into new things.",
     "Recycling is the reprocessing of waste materials into secondary raw materials to reduce resource depletion."),
    ("the teeth", "Teeth are the little white things in your mouth. They help you bite and chew your food.",
     "Teeth are calcified structures of enamel, dentin and pulp anchored in the alveolar bone for mastication."),
    ("a cold", "A cold is when a tiny germ makes your nose runny and you sneeze, but you get better soon.",
     "The common cold is a viral infection of the upper respiratory tract, most often caused by rhinoviruses."),
    ("the wheel", "A wheel is round so it can roll. It helps cars and bikes go without pushing too hard.",
     "The wheel is a circular component rotating on an axle that reduces friction through rolling motion."),
    ("a mirror", "A mirror is a shiny glass that shows you a picture of yourself when you look in it.",
     "A mirror is a surface with high specular reflectance that forms a virtual image by reflection."),
    ("a spider web", "A spider web is a net a spider makes from thin silk. It uses it to catch bugs to eat.",
     "A spider web is an orb or tangle structure of proteinaceous silk fibres secreted from spinneret glands."),
)


def explain_rows(topics: tuple[tuple[str, str, str], ...] = EXPLAIN_TOPICS) -> list[dict]:
    """One row per (topic, phrasing): ``{"prompt", "answer" (simple), "rejected" (technical), "topic"}``."""
    return [{"prompt": p.format(t), "answer": simple, "rejected": technical, "topic": t}
            for t, simple, technical in topics for p in EXPLAIN_PROMPTS]
