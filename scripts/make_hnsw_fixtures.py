"""Write real all-MiniLM-L6-v2 embeddings of generated sentences: the "real vectors" of
tests/native/test_hnsw.py.

Run with a Python that has torch (CPU) and sentence-transformers (not the project venv;
see shared/ENVIRONMENT.md), with the model folder at models/all-MiniLM-L6-v2:

    HF_HUB_OFFLINE=1 /work/stvenv/bin/python scripts/make_hnsw_fixtures.py
    HF_HUB_OFFLINE=1 /work/stvenv/bin/python scripts/make_hnsw_fixtures.py \\
        --n 12000 --out build/minilm_12k.npy      # a larger set for benchmarks, not committed

It writes tests/fixtures/hnsw_minilm_f16.npy: (n, 384) float16 unit vectors (the
sentence-transformers output rounded to f16; renormalize before use), one per sentence of
``sentences(n)``: short questions, statements and notes over twenty everyday and technical
topics, built from word lists with a seeded RNG, so topics form clusters and shared
phrasing forms near-duplicates, as in a real notes corpus. The sentences are not stored:
``sentences(n)`` regenerates them exactly.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "hnsw_minilm_f16.npy"
MODEL = REPO / "models" / "all-MiniLM-L6-v2"

TOPICS = {  # topic: (things, actions, qualities)
    "cooking": (["sourdough bread", "risotto", "tomato sauce", "cast iron pan", "pie crust",
                 "chicken stock", "curry paste", "pancake batter", "garlic butter", "ramen broth"],
                ["bake", "simmer", "season", "knead", "roast", "freeze", "thicken", "marinate"],
                ["crispy", "bland", "too salty", "fluffy", "burnt", "homemade", "spicy"]),
    "programming": (["Python script", "SQL query", "unit test", "REST endpoint", "git branch",
                     "memory leak", "regular expression", "Docker image", "race condition",
                     "JSON parser"],
                    ["debug", "refactor", "deploy", "profile", "rewrite", "merge", "cache",
                     "optimize"],
                    ["slow", "flaky", "broken", "legacy", "concurrent", "readable", "async"]),
    "finance": (["index fund", "mortgage", "credit card debt", "retirement account", "tax return",
                 "emergency fund", "stock portfolio", "car loan", "monthly budget", "invoice"],
                ["pay off", "refinance", "rebalance", "file", "save for", "diversify", "track"],
                ["expensive", "overdue", "tax-free", "risky", "fixed-rate", "quarterly"]),
    "sports": (["marathon", "penalty kick", "tennis serve", "bench press", "swim stroke",
                "basketball playoffs", "offside rule", "bicycle race", "ski slope", "golf swing"],
               ["train for", "improve", "watch", "referee", "warm up for", "practice", "win"],
               ["fast", "exhausting", "controversial", "professional", "amateur", "outdoor"]),
    "health": (["blood pressure", "migraine", "sleep schedule", "vitamin D", "knee injury",
                "flu vaccine", "allergy", "cholesterol", "back pain", "heart rate"],
               ["lower", "treat", "monitor", "prevent", "recover from", "test for", "manage"],
               ["chronic", "mild", "seasonal", "high", "sudden", "persistent"]),
    "travel": (["flight to Lisbon", "train pass", "hostel in Tokyo", "passport renewal",
                "road trip", "carry-on bag", "travel insurance", "visa application",
                "airport lounge", "hiking trail in Peru"],
               ["book", "cancel", "pack", "plan", "reschedule", "upgrade", "explore"],
               ["cheap", "delayed", "last-minute", "scenic", "crowded", "international"]),
    "music": (["guitar chord", "piano scale", "jazz album", "drum beat", "violin bow",
               "concert ticket", "vinyl record", "choir rehearsal", "synthesizer patch",
               "song lyrics"],
              ["tune", "record", "compose", "memorize", "mix", "transpose", "listen to"],
              ["acoustic", "out of tune", "classical", "loud", "melancholic", "live"]),
    "gardening": (["tomato plants", "compost pile", "rose bush", "lawn", "raised bed",
                   "apple tree", "herb garden", "seedlings", "hedge", "succulents"],
                  ["water", "prune", "fertilize", "repot", "plant", "protect", "harvest"],
                  ["wilting", "overgrown", "organic", "shady", "drought-tolerant", "yellowing"]),
    "astronomy": (["Jupiter's moons", "solar eclipse", "telescope lens", "Andromeda galaxy",
                   "meteor shower", "black hole", "Mars rover", "star chart", "comet",
                   "space station"],
                  ["observe", "photograph", "track", "measure", "explain", "locate"],
                  ["distant", "bright", "faint", "orbiting", "rare", "visible"]),
    "history": (["Roman empire", "French revolution", "industrial revolution", "Ming dynasty",
                 "cold war", "printing press", "silk road", "Viking raids", "ancient Egypt",
                 "medieval castle"],
                ["study", "explain", "compare", "date", "research", "teach"],
                ["ancient", "forgotten", "decisive", "turbulent", "influential"]),
    "law": (["rental contract", "small claims court", "copyright notice", "will and testament",
             "parking ticket", "employment agreement", "privacy policy", "patent",
             "divorce settlement", "noise complaint"],
            ["appeal", "sign", "draft", "dispute", "terminate", "enforce", "review"],
            ["binding", "unfair", "expired", "confidential", "legal", "void"]),
    "weather": (["thunderstorm", "heat wave", "snowfall", "humidity", "hurricane season",
                 "morning fog", "UV index", "frost", "monsoon", "wind chill"],
                ["forecast", "prepare for", "measure", "expect", "survive", "report"],
                ["severe", "unusual", "freezing", "tropical", "record-breaking"]),
    "cars": (["brake pads", "engine oil", "flat tire", "electric car battery", "transmission",
              "windshield wipers", "check engine light", "car insurance", "spark plugs",
              "used hatchback"],
             ["replace", "charge", "inspect", "fix", "sell", "lease", "diagnose"],
             ["noisy", "worn", "hybrid", "reliable", "leaking", "second-hand"]),
    "pets": (["puppy", "cat litter", "aquarium filter", "parrot", "dog leash", "hamster cage",
              "vet appointment", "flea treatment", "kitten food", "rabbit hutch"],
             ["adopt", "train", "feed", "groom", "walk", "clean", "vaccinate"],
             ["anxious", "playful", "senior", "shedding", "rescued", "hungry"]),
    "education": (["calculus exam", "essay outline", "student loan", "online course",
                   "lab report", "reading list", "thesis defense", "spelling test",
                   "scholarship application", "lecture notes"],
                  ["study for", "grade", "submit", "outline", "revise", "enroll in"],
                  ["difficult", "late", "graduate", "introductory", "mandatory"]),
    "home": (["leaking faucet", "kitchen cabinets", "attic insulation", "smoke detector",
              "bathroom tiles", "washing machine", "wifi router", "ceiling fan", "doorbell",
              "heating bill"],
             ["repair", "install", "paint", "reset", "clean", "upgrade", "insulate"],
             ["drafty", "old", "smart", "energy-efficient", "cracked", "noisy"]),
    "movies": (["horror film", "documentary", "movie soundtrack", "film festival",
                "animated series", "plot twist", "director's cut", "streaming service",
                "box office hit", "silent film"],
               ["review", "recommend", "stream", "rewatch", "analyze", "subtitle"],
               ["underrated", "boring", "award-winning", "black and white", "gripping"]),
    "chemistry": (["titration", "covalent bond", "periodic table", "catalyst", "pH buffer",
                   "polymer", "oxidation reaction", "molar mass", "distillation",
                   "noble gas"],
                  ["balance", "calculate", "synthesize", "dilute", "measure", "classify"],
                  ["acidic", "volatile", "stable", "exothermic", "toxic", "inert"]),
    "networking": (["VPN tunnel", "DNS record", "firewall rule", "TLS certificate",
                    "packet loss", "IPv6 address", "load balancer", "WebRTC connection",
                    "subnet mask", "proxy server"],
                   ["configure", "troubleshoot", "renew", "block", "route", "encrypt"],
                   ["expired", "misconfigured", "secure", "intermittent", "public"]),
    "parenting": (["toddler tantrum", "bedtime routine", "school lunch", "screen time",
                   "birthday party", "homework help", "baby formula", "car seat",
                   "teenager curfew", "allowance"],
                  ["handle", "plan", "limit", "negotiate", "organize", "set up"],
                  ["picky", "exhausted", "first-time", "strict", "fun", "affordable"]),
}

PATTERNS = [
    "How do I {a} a {q} {t}?",
    "What is the best way to {a} my {t}?",
    "My {t} is {q}, what should I do?",
    "Notes: {a} the {t} before the weekend.",
    "Is it safe to {a} {t} that is {q}?",
    "I spent the afternoon trying to {a} the {t}.",
    "Why does every {t} end up {q}?",
    "Reminder to {a} the {t} and check whether it is still {q}.",
    "Can someone explain how to {a} a {t}?",
    "Yesterday the {t} turned out {q} again.",
    "A short guide to {t}: how to {a} it when it gets {q}.",
    "Comparing two ways to {a} a {q} {t}.",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct generated sentences (deterministic for a given seed)."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    out, seen = [], set()
    while len(out) < n:
        things, actions, qualities = TOPICS[rng.choice(topics)]
        s = rng.choice(PATTERNS).format(t=rng.choice(things), a=rng.choice(actions),
                                        q=rng.choice(qualities))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="number of sentences (default 2000)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(MODEL), device="cpu")
    emb = model.encode(sentences(args.n), batch_size=64, convert_to_numpy=True,
                       normalize_embeddings=True)
    assert emb.shape == (args.n, 384), emb.shape
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, emb.astype("<f2"))
    print(f"wrote {args.out} ({args.n} x 384 float16, {args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
