"""The number-words domain: English number words → German, generated, with word alignments.

German says units before tens ("forty-two" → "zweiundvierzig"), so a model must learn a real reordering. The
corpus (:mod:`.numbers`) feeds ``vaswani demo`` (:mod:`.run`), the tiny model of the tests and pictures
(:mod:`.toy`) and the alignment scores of :mod:`vaswani.visual.alignment`.
"""
