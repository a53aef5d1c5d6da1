"""Running a fixed list of commands as resumable stages (the main job, ``demo.py``).

stage.py      Stage (one command, its outputs, the server it needs), StageResult, StageFailed
cache.py      completeness markers and fingerprints: which stages are done, to resume, or to redo
processes.py  one command in its own process group: full output to its log, a short view to the
              terminal (the children's ``[tag]`` lines, their progress as ``[progress]`` lines)
runner.py     run_pipeline: the stages in order, the one judge server kept up between two stages
dry_run.py    check_stages: every stage's command with --dry_run (its own checks, nothing run), seconds
"""
