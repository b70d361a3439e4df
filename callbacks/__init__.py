"""Lightning callbacks of lycoflow: adapter export, prompt-suite generation, evaluation and logging."""
