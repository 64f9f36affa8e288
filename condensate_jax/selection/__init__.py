"""Selection: which keys each query's condensate set holds (DESIGN.md §1, §4).

exact.py         exact top-k over every score, the set as a mask or as positions, and its
                 certificate
summaries.py     per-block min/max key summaries (built at prefill, appended per token)
bounds.py        score bounds U_b and ranking scores from the summaries
order.py         block orders shared by a GQA group, exact top-M by several methods
prefill_lists.py per-query-block key-block lists of the block-sparse prefill
"""
