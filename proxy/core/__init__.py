"""The pure core: the vocabulary, errors, pricing, parsing, metering and budget decisions.

Nothing here does I/O or reads the clock: time is passed in.
"""
