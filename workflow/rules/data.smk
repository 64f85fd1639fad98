# The embedded demo dataset: a synthetic taxonomy with planted traits and their ground-truth masks.
if config["data"].get("synthetic"):

    def synthetic_threads():
        """Processes rendering the demo: one per 1,000 images (about 15 s of rendering each), at least two (the
        demo's); Snakemake caps them at --cores. The output does not depend on them."""
        synthetic = config["data"]["synthetic"]
        species = (synthetic["n_orders"] * synthetic["families_per_order"] * synthetic["genera_per_family"]
                   * synthetic["species_per_genus"])
        images = species * (synthetic["n_train"] + synthetic["n_val"] + synthetic["n_test"])
        return max(2, images // 1000)

    rule synthetic_data:
        output:
            manifest=f"{SYNTHETIC}/manifest.csv",
            taxonomy=f"{SYNTHETIC}/taxonomy.csv",
            traits=f"{SYNTHETIC}/traits.csv",
        params:
            settings=settings("data.synthetic"),
        log:
            f"{LOGS}/synthetic_data.log",
        benchmark:
            f"{BENCH}/synthetic_data.tsv"
        threads: synthetic_threads()
        script:
            "../scripts/synthetic_data.py"
