"""``whale review``: the web page over the batches ``whale identify`` kept (:mod:`.app`)."""
