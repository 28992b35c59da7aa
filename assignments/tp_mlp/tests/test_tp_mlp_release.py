"""tp_mlp's release states every name its tests call, with the source's signature: a changed or
missing signature is caught (tpcourse.release.unstated, run on every notebook by
tests/test_release.py)."""
import assignments
from tpcourse.release import unstated
from tpjudge.cells import grade_id, read

A = assignments.get("tp_mlp")


def test_a_missing_or_changed_signature_is_caught():
    source = read(A.notebook)
    released = read(assignments.REPO / "release" / A.name / f"{A.name}.ipynb")
    [cell] = [c for c in released.cells if grade_id(c) == "sol_comm_counts"]
    text = cell.source
    cell.source = text.replace("bytes_per_elem=2)", "bytes_per_elem=4)")
    assert unstated(source, released) == [
        "ring_allreduce_bytes: the release says (num_elements, num_ranks, bytes_per_elem=4), "
        "the source (num_elements, num_ranks, bytes_per_elem=2)"]
    cell.source = "# YOUR CODE HERE\nraise NotImplementedError()"   # the old, swallowed cell
    assert {p.split(":")[0] for p in unstated(source, released)} == {
        "allreduces_per_layer", "ring_allreduce_bytes", "layer_allreduce_bytes"}
