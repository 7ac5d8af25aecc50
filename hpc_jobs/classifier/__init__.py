"""Cell classifier shared by ``train_classifier`` and ``predict``: the network
(:mod:`.model`), the crops it sees (:mod:`.data`) and its metrics (:mod:`.metrics`)."""
