"""Prompt sets for parity runs: built-in varied texts, or text / JSONL files.

A prompt is a token list of an exact length. Prompt `i` of length `L` starts with source
text `i` and, when that text is shorter than `L` tokens, continues with the following
texts (cyclically, separated by a blank line) until it has `L` tokens. Long prompts over
the built-in set therefore repeat it; use files for long natural contexts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Callable, Sequence

# Written for this project: prose, code, a list, dialogue, a table-like record, a letter,
# technical notes and verse, so that attention patterns differ between prompts.
BUILTIN_TEXTS: dict[str, str] = {
    "prose": (
        "The ferry left the harbour an hour late, which nobody minded. The morning had "
        "come in grey and soft, and the gulls rode the swell beside the hull as if they "
        "had been hired to escort it. Mara stood at the rail with her coat buttoned to "
        "the chin and watched the town shrink into a line of coloured doors. She had "
        "lived there for eleven years and had never once seen it from the water. From "
        "here the church looked smaller than the bakery, and the bakery looked like a "
        "child's drawing of a bakery, square and certain, with a chimney that leaned. "
        "Her brother had told her that leaving was the easy part. The hard part, he "
        "said, was the week after, when the new place still smelled of someone else's "
        "cooking and every drawer opened onto a stranger's idea of order. She had "
        "laughed at him then. Now she found herself counting the things she had not "
        "packed: the blue bowl with the chipped rim, the radio that only found one "
        "station, the key to the shed that she had meant to leave with the neighbour "
        "and had instead carried, warm and useless, in her pocket all the way to the "
        "pier. The island appeared at noon as a low smudge that slowly grew trees. A "
        "boy on the upper deck shouted that he could see the lighthouse, and everyone "
        "turned to look, though it was only a white post with a lamp on top. Mara "
        "decided she liked it anyway. It did not pretend to be more than it was, and "
        "it stood exactly where it was needed, at the end of the rocks, where the "
        "water turned from green to black."
    ),
    "code": (
        "import collections\n"
        "import dataclasses\n\n\n"
        "@dataclasses.dataclass\n"
        "class Edge:\n"
        "    src: str\n"
        "    dst: str\n"
        "    weight: float = 1.0\n\n\n"
        "class Graph:\n"
        "    \"\"\"A small directed graph with weighted edges.\"\"\"\n\n"
        "    def __init__(self, edges=()):\n"
        "        self.adj = collections.defaultdict(list)\n"
        "        for edge in edges:\n"
        "            self.add(edge)\n\n"
        "    def add(self, edge):\n"
        "        if edge.weight < 0:\n"
        "            raise ValueError(f\"negative weight on {edge.src}->{edge.dst}\")\n"
        "        self.adj[edge.src].append(edge)\n\n"
        "    def shortest(self, start):\n"
        "        import heapq\n"
        "        dist = {start: 0.0}\n"
        "        queue = [(0.0, start)]\n"
        "        while queue:\n"
        "            d, node = heapq.heappop(queue)\n"
        "            if d > dist.get(node, float(\"inf\")):\n"
        "                continue\n"
        "            for edge in self.adj[node]:\n"
        "                nd = d + edge.weight\n"
        "                if nd < dist.get(edge.dst, float(\"inf\")):\n"
        "                    dist[edge.dst] = nd\n"
        "                    heapq.heappush(queue, (nd, edge.dst))\n"
        "        return dist\n\n\n"
        "def load(lines):\n"
        "    edges = []\n"
        "    for number, line in enumerate(lines, 1):\n"
        "        parts = line.split()\n"
        "        if len(parts) not in (2, 3):\n"
        "            raise ValueError(f\"line {number}: expected 'src dst [weight]'\")\n"
        "        weight = float(parts[2]) if len(parts) == 3 else 1.0\n"
        "        edges.append(Edge(parts[0], parts[1], weight))\n"
        "    return Graph(edges)\n\n\n"
        "if __name__ == \"__main__\":\n"
        "    graph = load([\"a b 2\", \"b c 1\", \"a c 5\", \"c d 1\"])\n"
        "    for node, d in sorted(graph.shortest(\"a\").items()):\n"
        "        print(f\"{node}: {d:.1f}\")\n"
    ),
    "list": (
        "Packing list for a four-day hike, revised after last year's trip:\n\n"
        "1. Tent, poles, pegs (count them: twelve), and the repaired groundsheet.\n"
        "2. Sleeping bag rated to minus five, in its waterproof sack.\n"
        "3. Stove, two gas canisters, lighter, spare lighter, matches in a jar.\n"
        "4. Pot with lid, one spoon each, a folding knife, a small sponge.\n"
        "5. Water filter, two one-litre bottles, purification tablets as backup.\n"
        "6. Food: oats and raisins for breakfast; bread, cheese and apples for lunch; "
        "lentils, rice and curry paste for dinner; chocolate, nuts, dried mango.\n"
        "7. Map sheets 14 and 15, compass, the printed route with camp sites marked.\n"
        "8. Headtorch with fresh batteries, and a second set taped inside the lid.\n"
        "9. First aid: plasters, blister pads, tape, painkillers, antihistamine, "
        "tweezers, a foil blanket.\n"
        "10. Rain jacket, rain trousers, fleece, two base layers, hat, gloves.\n"
        "11. Three pairs of socks, one kept dry at all costs for the evenings.\n"
        "12. Sun cream, insect repellent, a small towel, toothbrush, toilet trowel.\n"
        "13. Phone, battery pack, cable; the phone stays off except at camp.\n"
        "14. Notebook and pencil, because the pen froze last time.\n"
        "15. Rubbish bag: everything we carry in, we carry out.\n\n"
        "Things we took last year and did not need: the second saucepan, the camp "
        "chair, the paperback nobody opened, and four of the six tins of beans.\n"
        "Things we needed and did not have: a spare bootlace, more tape, patience.\n"
    ),
    "dialogue": (
        "CUSTOMER: Hi, I ordered a bookshelf two weeks ago and it still hasn't arrived.\n"
        "AGENT: I'm sorry about that. Could you give me the order number?\n"
        "CUSTOMER: It's 4471-B. The tracking page has said 'in transit' for nine days.\n"
        "AGENT: Thank you. I can see the parcel left our warehouse on the third. It was "
        "scanned at the regional depot on the fifth and hasn't been scanned since.\n"
        "CUSTOMER: So where is it?\n"
        "AGENT: Most likely still at the depot. Large items sometimes wait for a "
        "two-person van. I'll open a trace with the courier now.\n"
        "CUSTOMER: How long does a trace take?\n"
        "AGENT: Usually two working days. If they find it, they'll book a delivery slot "
        "and you'll get a text. If they don't, we send a replacement at no cost.\n"
        "CUSTOMER: Can you just send the replacement now? I've taken a day off twice.\n"
        "AGENT: I understand. I can't ship a second one while the first is open, but I "
        "can mark the trace as urgent and refund the delivery fee today.\n"
        "CUSTOMER: Fine. And if it turns up damaged?\n"
        "AGENT: Refuse it at the door, or take photos and write to us within seven days. "
        "Either way we'll replace it.\n"
        "CUSTOMER: Okay. What's the reference for the trace?\n"
        "AGENT: TR-90312. I've also added a note so whoever you speak to next can see "
        "this conversation.\n"
        "CUSTOMER: Thanks. Sorry for being short with you.\n"
        "AGENT: Not at all, nine days is a long time to look at a tracking page. Is "
        "there anything else I can help with?\n"
        "CUSTOMER: No, that's everything.\n"
    ),
    "record": (
        "station,date,min_c,max_c,rain_mm,wind_kmh,notes\n"
        "north_ridge,2024-03-01,-2.1,6.4,0.0,18,clear morning; frost in hollows\n"
        "north_ridge,2024-03-02,0.3,8.9,1.2,22,light showers after 15:00\n"
        "north_ridge,2024-03-03,1.8,7.5,9.6,41,gale warning; sensor 2 offline\n"
        "north_ridge,2024-03-04,-0.5,5.2,3.3,35,sensor 2 restored at 09:40\n"
        "valley_farm,2024-03-01,1.4,9.8,0.0,7,calm\n"
        "valley_farm,2024-03-02,2.9,11.3,0.8,9,calm; fog until 10:00\n"
        "valley_farm,2024-03-03,4.1,10.1,14.7,26,river level +0.4 m\n"
        "valley_farm,2024-03-04,2.2,8.7,2.0,19,river level falling\n"
        "coast_pier,2024-03-01,3.8,8.1,0.0,24,swell 1.5 m\n"
        "coast_pier,2024-03-02,4.6,9.0,2.5,31,swell 2.1 m\n"
        "coast_pier,2024-03-03,5.0,8.4,11.9,58,pier closed 12:00-18:00\n"
        "coast_pier,2024-03-04,4.2,7.9,4.1,37,pier reopened\n\n"
        "Summary: the storm of 3 March brought the highest rainfall at valley_farm "
        "(14.7 mm) and the strongest wind at coast_pier (58 km/h). Minimum temperatures "
        "stayed above freezing everywhere except north_ridge on the 1st and 4th. Sensor 2 "
        "at north_ridge was offline for about eighteen hours; its readings for that "
        "period are interpolated and flagged in the raw export.\n"
    ),
    "letter": (
        "Dear Mr Okafor,\n\n"
        "Thank you for your letter of 12 June about the footpath behind Elm Terrace. I "
        "have now visited the site with the council's rights-of-way officer, and I want "
        "to set out what we found and what will happen next.\n\n"
        "First, the path is a public footpath and has been since at least 1952; it "
        "appears on the definitive map. The fence that now crosses it near the old mill "
        "was put up without permission, and the landowner has been asked to remove it "
        "within twenty-eight days. If it is still there after that, the council will "
        "remove it and recover the cost.\n\n"
        "Second, the surface. The lower section floods after heavy rain because the "
        "drain under the stile is blocked. This is our responsibility, and a crew is "
        "booked for the week of 8 July to clear it and lay a short stretch of gravel.\n\n"
        "Third, you asked about a bench at the top of the hill. I cannot promise one "
        "this year, but I have added it to the list for the parish fund, which meets in "
        "September. A letter of support from residents would help.\n\n"
        "I am sorry it took a complaint to get this moving. Please write again if the "
        "fence has not gone by the end of July, and quote reference PF/2291 so that it "
        "comes straight to me.\n\n"
        "Yours sincerely,\n\nJ. Hartley\nRights of Way Team\n"
    ),
    "notes": (
        "Lab notes, week 14. Goal: find out why the calibration drifts overnight.\n\n"
        "Monday. Logged the reference voltage every minute for 24 h. Drift of about "
        "0.8 mV, mostly between 02:00 and 05:00. Room temperature falls by 3 degrees in "
        "the same window when the heating switches off. Correlation looks strong, but "
        "the sensor is rated for 0.05 mV per degree, which only explains 0.15 mV.\n\n"
        "Tuesday. Wrapped the board in foam to slow temperature changes. Drift dropped "
        "to 0.5 mV. So temperature matters, but something else does too. Candidates: "
        "the supply rail, the cable to the logger, or the logger itself.\n\n"
        "Wednesday. Swapped the logger for the spare. No change. Put a scope on the "
        "supply rail: a 50 Hz ripple of 2 mV peak-to-peak, larger at night. The building "
        "load changes at night (the freezers cycle), which could move the mains.\n\n"
        "Thursday. Ran the board from a battery pack for a night. Drift 0.12 mV, close "
        "to the thermal prediction. The supply is the main culprit. Next step: add a "
        "low-noise regulator and repeat with mains power.\n\n"
        "Friday. Regulator fitted. Overnight drift 0.14 mV on mains. Done, apart from "
        "writing it up. Lesson: measure the supply before blaming the sensor.\n"
    ),
    "verse": (
        "The kettle ticks as it cools on the stove,\n"
        "the cat has claimed the chair by the door,\n"
        "and rain keeps the time on the window glass\n"
        "the way it has kept it for years before.\n\n"
        "Somebody's radio two floors down\n"
        "is losing a game in a distant town;\n"
        "the crowd goes up and the crowd goes quiet,\n"
        "and the rain does not care, and the rain comes down.\n\n"
        "I meant to write to you weeks ago.\n"
        "I meant to say that the plum tree bloomed,\n"
        "that the fence we painted has held its green,\n"
        "that I moved the desk to the smaller room.\n\n"
        "Instead I am counting the drops on the pane,\n"
        "losing the count and starting again,\n"
        "as if by the hundredth I might know\n"
        "what to put first when I write it plain.\n\n"
        "So: the plum tree bloomed. The paint held fast.\n"
        "The desk looks out on the neighbour's wall.\n"
        "The kettle is cold, the cat is asleep,\n"
        "and I miss you more than the rain, that's all.\n"
    ),
}


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: `tokens` has exactly `length` ids; `source` names the first text."""
  id: str
  source: str
  length: int
  tokens: tuple[int, ...]

  @property
  def sha(self) -> str:
    return hashlib.sha256(json.dumps(self.tokens).encode()).hexdigest()[:16]


def read_texts(files: Sequence[str], jsonl_field: str = "text") -> dict[str, str]:
  """Texts from .txt files (one text per file) and .jsonl files (one per line)."""
  texts: dict[str, str] = {}
  for name in files:
    path = pathlib.Path(name).expanduser()
    if not path.is_file():
      raise ValueError(f"prompts.files entry {name!r}: no such file.")
    if path.suffix == ".jsonl":
      for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as err:
          raise ValueError(f"prompts.files {name!r} line {number}: invalid JSON ({err}).")
        if not isinstance(record, dict) or not isinstance(record.get(jsonl_field), str):
          raise ValueError(
              f"prompts.files {name!r} line {number}: expected an object with a string "
              f"field {jsonl_field!r} (prompts.jsonl_field).")
        key = str(record.get("id", f"{path.stem}:{number}"))
        texts[key] = record[jsonl_field]
    else:
      texts[path.stem] = path.read_text(encoding="utf-8")
  if not texts:
    raise ValueError(f"prompts.files={list(files)!r}: expected at least one text.")
  return texts


def build_prompts(texts: dict[str, str], encode: Callable[[str], list[int]], *,
                  num: int, lengths: Sequence[int]) -> list[Prompt]:
  """`num` prompts (starting at the first `num` texts) at each length in `lengths`."""
  names = list(texts)
  if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= len(names):
    raise ValueError(
        f"prompts.num={num!r}: expected an int in [1, {len(names)}] (the number of "
        "source texts).")
  encoded = {name: list(encode(texts[name])) for name in names}
  separator = list(encode("\n\n"))
  prompts = []
  for length in lengths:
    for i in range(num):
      tokens: list[int] = []
      j = i
      while len(tokens) < length:
        if tokens:
          tokens += separator
        tokens += encoded[names[j % len(names)]]
        j += 1
        if j - i > len(names) and not any(encoded.values()):
          raise ValueError("every prompt text encodes to no tokens.")
      prompts.append(Prompt(f"{names[i]}@{length}", names[i], length,
                            tuple(int(t) for t in tokens[:length])))
  return prompts
