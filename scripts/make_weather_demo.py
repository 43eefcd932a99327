"""Writes the demo generation task, src/softprompt/demo/weather_{train,test}.csv: invented
weather records (`data`) and two or three hand-written phrasings of each (`report`), several
references per input as in E2E. Seeded, so the files are the same on every run:

    python scripts/make_weather_demo.py
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

CITIES = ["Oslo", "Lisbon", "Nairobi", "Osaka", "Quito", "Perth", "Dublin", "Tunis", "Hanoi",
          "Denver", "Krakow", "Recife", "Cork", "Malmo", "Tbilisi", "Leeds", "Accra", "Bergen",
          "Porto", "Halifax"]  # fmt: skip
SKIES = {"sunny": "sunshine", "cloudy": "clouds", "rainy": "rain", "snowy": "snow", "foggy": "fog"}
WINDS = {"calm": "no wind", "light": "a light breeze", "strong": "strong winds"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

PHRASINGS = [
    "{city} will be {sky} on {day} at {temp} degrees, with {wind}.",
    "Expect {noun} in {city} on {day}: {temp} degrees and {wind}.",
    "On {day}, {city} sees {noun} and {wind}, around {temp} degrees.",
    "{day} in {city}: {sky}, {temp} degrees, {wind}.",
]


def record(rng: random.Random) -> dict:
    sky = rng.choice(list(SKIES))
    temp = rng.randint(-5, 2) if sky == "snowy" else rng.randint(3, 34)
    return dict(
        city=rng.choice(CITIES),
        day=rng.choice(DAYS),
        sky=sky,
        noun=SKIES[sky],
        temp=temp,
        wind_key=(w := rng.choice(list(WINDS))),
        wind=WINDS[w],
    )


def rows(rng: random.Random, n: int, seen: set) -> list[dict]:
    out = []
    while len({r["data"] for r in out}) < n:
        r = record(rng)
        data = f"city[{r['city']}], day[{r['day']}], sky[{r['sky']}], temperature[{r['temp']}], wind[{r['wind_key']}]"  # fmt: skip
        if data in seen:
            continue
        seen.add(data)
        for p in rng.sample(PHRASINGS, rng.choice((2, 3))):
            out.append({"data": data, "report": p.format(**r)})
    return out


def main() -> None:
    rng = random.Random(7)
    seen: set = set()
    demo = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "demo"
    for name, n in (("weather_train.csv", 120), ("weather_test.csv", 40)):
        with open(demo / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["data", "report"])
            w.writeheader()
            w.writerows(rows(rng, n, seen))


if __name__ == "__main__":
    main()
