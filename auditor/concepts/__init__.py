"""Concept extraction: a prompt -> typed concepts with lexicon categories, bindings and token indices.

Roles: object, attribute (with ``binds_to`` its object), count (``value``, binds to its object), relation
(``subject`` and ``object``), position ("on the left", binds to its object), style ("oil painting",
"in the style of van gogh") and background ("on a white background": an object of its own, never a shape).

How a parsed prompt is read (spaCy's small model parses it; the lexicon repairs what it gets wrong):
0. the prompt is normalised first (``auditor.nlp.normalise_prompt``: NFKC, invisible format characters removed);
   when that changes it, ``Concepts.original`` and ``Concepts.changes`` say so and spans index the normalised text;
1. multiword lexicon entries ("fire hydrant", "oil painting") are merged into one token, and so are hyphenated
   compounds ("close-up", "black-and-white") and numerals with their unit ("35mm", "85 mm lens"); a word with
   digits counts only when it is a plain number ("3 cats"), not a format ("4k"), a decade or a year ("1920s");
2. marker phrases are found: relations ("to the left of"), positions ("on the left"), style markers, and one-word
   prepositions ("on", "in", "by", "with") where no longer phrase took the word;
3. the remaining words are cut into nominal runs, "determiner/number + modifiers + head noun". Word classes come
   from spaCy's tags, repaired by the lexicon: the small model tags colour words as proper nouns ("cyan cross"),
   shape nouns as verbs or adjectives ("a green cross", "a pink square"), and "orange" either way. A run's head is
   its last word that can be a noun, so "an orange star" is a star coloured orange and "an orange" is the fruit;
4. modifiers with no head ("the car is red", "a car that is not red") bind through the dependency tree; a verb of
   action the parse hangs on a garment, a body part or an absent object describes who wears, has or lacks it ("a
   chef in a white apron cooking", "a knight with a long beard wearing armor", "a man without shoes walking").
   A verb the lexicon lacks is an action all the same when the tagger and parser make it one and its ending shows
   it ("a tiger resting", "a car parked"; ``category_source`` "parse"); a decade or year where a noun stands ("in
   the 1970s") is the scene's era, and a bare unknown noun among tags after a comma ("..., f/1.8, soft light") a
   word about the picture, a style;
5. relations, positions, styles and negation attach to the runs around them. A relation places the one doing
   the verb before it ("a man holding an umbrella in the rain"), else the nearest object before it that is present
   and is not a garment, body part or accessory of the noun before ("a woman in a red dress on a beach"); each of
   coordinated subjects and objects gets it ("a cat and a dog on a sofa"). A garment worn ("in a red dress"), a
   time ("at night") or an absent object ("no cars") is in no relation. Suite overrides are applied; token
   indices come from ``auditor.align`` (words past the 77-token limit are kept, marked ``truncated``).
"""

from __future__ import annotations


from auditor.concepts.extract import extract, extract_many, resolve_tokenizer
from auditor.concepts.records import ROLE_ORDER, VISIBLE_ROLES, Concept, Concepts

__all__ = ["ROLE_ORDER", "VISIBLE_ROLES", "Concept", "Concepts", "extract", "extract_many", "resolve_tokenizer"]
