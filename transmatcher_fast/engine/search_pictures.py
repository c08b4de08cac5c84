"""Pictures of a search (``transmatcher-fast search --pictures``): each query's ranked list, drawn
as ``visualize`` draws ranked lists, and for a fused matcher the local correspondences of each
query with its nearest gallery image.

The images have no identities, so the tiles have no green / red frame: under each gallery image
are its rank and distance, and the title names the query's file. Only the ranking's files are
read (the few features a correspondence needs are extracted again), so a gallery of any size
costs nothing here.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Union

from . import visualize
from .search import Ranking

# Queries drawn at most (a search may have thousands of queries; pictures are for looking at).
MAX_QUERIES = 50


def _name(prefix: str, query: int, num_query: int, path: str) -> str:
    return f"{prefix}_q{query:0{len(str(max(num_query - 1, 0)))}d}_{Path(path).stem}.png"


def save_search_pictures(folder: Union[str, Path], reid, ranking: Ranking,
                         max_queries: int = MAX_QUERIES) -> List[Path]:
    """Ranked lists (``ranked_q<i>_<query file>.png``) of the first ``max_queries`` queries of
    ``ranking`` and, when ``reid.matcher`` is a fused matcher, the correspondences of each with
    its nearest gallery image (``correspondence_q<i>_<query file>.png``). Needs the files of
    the queries and gallery images (``ranking.query_paths`` / ``gallery_paths``). Returns the
    paths written."""
    if ranking.query_paths is None or ranking.gallery_paths is None:
        raise ValueError("pictures need the images' files: give the query and gallery as paths")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = min(len(ranking), max_queries)
    written = []
    for qi in range(count):
        q_path = ranking.query_paths[qi]
        ranked = ranking.paths[qi]
        picture = visualize.ranked_list_image(
            q_path, ranked, [False] * len(ranked), values=ranking.distances[qi].tolist(),
            kind=ranking.kind, gallery_labels=[f"#{r}" for r in range(1, len(ranked) + 1)],
            query_label=Path(q_path).name[:12], border=0,
            title=f"query {qi}: {Path(q_path).name}  -  ranked by {visualize.kind_header(ranking.kind)}")
        path = folder / _name("ranked", qi, len(ranking), q_path)
        picture.save(path)
        written.append(path)
    if visualize.draws_correspondences(reid.matcher):
        for qi in range(count):
            q_path, g_path = ranking.query_paths[qi], ranking.paths[qi][0]
            features = reid.extract([q_path, g_path], desc="correspondences").features.float().to(reid.device)
            matches = visualize.correspondences(reid.matcher, features[:1], features[1:2])
            written.append(visualize.save_correspondences(
                folder / _name("correspondence", qi, len(ranking), q_path), q_path, g_path, matches,
                distance=float(ranking.distances[qi, 0]), probe_label=f"query {qi}, {Path(q_path).name}",
                gallery_label=f"rank 1, {Path(g_path).name}"))
    return written
