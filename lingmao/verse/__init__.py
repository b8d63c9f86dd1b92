"""Classical verse: forms and their layouts, Pingshui rhyme, level and oblique tones (平仄), ci tunes (词牌).

Plain Python and torch: `pingshui` (the rhyme table), `cilin` and `modern` (other rhyme systems), `meter` (the
tonal patterns of regulated verse), `tunes` (ci templates), `shape` (splitting a text into lines), `checker` (the
verdict on one poem and rates over many), `notation` (tone marks under a poem), `vocab` (per-tokenizer tables) and
`forms` (constrained decoding).
"""
