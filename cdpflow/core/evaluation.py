"""Identity resolution quality against ground truth: pairwise precision and recall, and more.

Records are identifiers. Truth says which real persons used each identifier (a shared family
email or kiosk device belongs to several). A pair of identifiers is a true match when they
share a person, and a predicted match when they are in the same profile:

    precision = true matches predicted / matches predicted
    recall    = true matches predicted / true matches

Only identifiers both in the truth and in the warehouse count (an identifier that never reached
the warehouse in a valid event cannot be resolved). Shared identifiers (listed for more than one
person: a family's email, a kiosk) are left out of the pairs, because no partition can place
them with every owner; the report counts them and how many ended with one of their owners.
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from typing import Dict, List, Mapping, Set, Tuple

from cdpflow.errors import BadInput
from cdpflow.schemas.records import Identifier

TRUTH_COLUMNS = ("person_id", "identifier_type", "identifier_value")


@dataclass
class IdentityReport:
    precision: float
    recall: float
    predicted_pairs: int
    true_pairs: int
    correct_pairs: int
    identifiers: int
    persons: int
    profiles: int
    profiles_per_person: Dict[int, int]  # how many persons are spread over n profiles
    biggest: List[Tuple[str, int, int]]  # (profile_id, identifiers, distinct persons)
    shared_identifiers: int = 0
    shared_with_an_owner: int = 0


def load_truth(path: str) -> Dict[Identifier, Set[str]]:
    """truth/identities.csv (person_id,identifier_type,identifier_value) -> identifier -> persons."""
    truth: Dict[Identifier, Set[str]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in TRUTH_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise BadInput(f"{path}: a truth file is CSV with the header {','.join(TRUTH_COLUMNS)} (as the "
                               f"generator's truth/identities.csv); missing {', '.join(missing)}, found "
                               f"{','.join(reader.fieldnames or ()) or 'no header'}")
            for line, row in enumerate(reader, start=2):
                values = [row.get(c) for c in TRUTH_COLUMNS]
                if any(v is None or v == "" for v in values):
                    raise BadInput(f"{path}:{line}: every row needs {', '.join(TRUTH_COLUMNS)}")
                truth.setdefault((row["identifier_type"], row["identifier_value"]), set()).add(row["person_id"])
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); a truth file is UTF-8 CSV") from None
    except IsADirectoryError:
        raise BadInput(f"{path} is a folder; give the truth CSV (e.g. truth/identities.csv)") from None
    return truth


def evaluate(links: Mapping[Identifier, str], truth: Mapping[Identifier, Set[str]], top: int = 10) -> IdentityReport:
    """Compares identifier -> profile (the warehouse) with identifier -> persons (the truth)."""
    both = sorted(set(links) & set(truth))
    shared = [i for i in both if len(truth[i]) > 1]
    common = [i for i in both if len(truth[i]) == 1]
    members_of: Dict[str, Set[str]] = {}
    for identifier in common:
        members_of.setdefault(links[identifier], set()).update(truth[identifier])
    with_owner = sum(1 for i in shared if truth[i] & members_of.get(links[i], set()))
    by_profile: Dict[str, List[Identifier]] = {}
    for identifier in common:
        by_profile.setdefault(links[identifier], []).append(identifier)
    predicted = correct = 0
    for members in by_profile.values():
        predicted += len(members) * (len(members) - 1) // 2
        for a, b in combinations(members, 2):
            if truth[a] & truth[b]:
                correct += 1
    by_person: Dict[str, List[Identifier]] = {}
    for identifier in common:
        for person in truth[identifier]:
            by_person.setdefault(person, []).append(identifier)
    true_pairs: Set[Tuple[Identifier, Identifier]] = set()
    for members in by_person.values():
        true_pairs.update(combinations(sorted(members), 2))
    spread = Counter(len({links[i] for i in members}) for members in by_person.values())
    biggest = sorted(((pid, len(m), len(set().union(*(truth[i] for i in m)))) for pid, m in by_profile.items()),
                     key=lambda r: (-r[1], r[0]))[:top]
    return IdentityReport(
        precision=correct / predicted if predicted else 1.0,
        recall=correct / len(true_pairs) if true_pairs else 1.0,
        predicted_pairs=predicted, true_pairs=len(true_pairs), correct_pairs=correct,
        identifiers=len(common), persons=len(by_person), profiles=len(by_profile),
        profiles_per_person=dict(sorted(spread.items())), biggest=biggest,
        shared_identifiers=len(shared), shared_with_an_owner=with_owner)
