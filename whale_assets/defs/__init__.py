"""One module per asset group (and jobs, automation, executor); ``load_from_defs_folder`` collects them all."""
