"""Everything that knows a foreign checkpoint layout.

One module per source format. Each turns a foreign state dict into ours by
rules (regular expressions and loops, not a literal table), accounts for every
key, and loads through `common.load_into`, which refuses a missing, extra or
wrongly shaped tensor with an error naming the file and the keys.
"""
