"""The self-contained HTML pages of loraflow's reports: evaluation (:mod:`.eval_page`) and
drift (:mod:`.drift_page`), rendered from ``templates/`` with the charts of :mod:`.charts`."""
