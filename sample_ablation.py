"""
The four-panel sampling ablation of math.md §5 (issue 6): one grid, rows = prompts, columns = the panels
(training schedule + zsnr read as v; 0.024 read as v; 0.012 read as v; 0.012 read as eps). Not written yet.
"""
