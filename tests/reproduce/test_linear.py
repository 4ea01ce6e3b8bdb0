"""``fedlora experiment linear``: RoLoRA learns the shared direction, FFA-LoRA cannot."""

from fedlora.reproduce.linear import LinearSetup, run_linear, simulate

SETUP = LinearSetup(dim=20, num_clients=4, examples=60, rounds=40)


def test_rolora_converges_and_ffa_stays_at_its_random_floor():
    rolora, ffa = simulate("rolora", SETUP), simulate("ffa", SETUP)
    assert rolora["sin_theta"][-1] < 0.1 and rolora["error"][-1] < 0.1
    assert ffa["sin_theta"][-1] == ffa["sin_theta"][0]  # A never changes
    # the best b for a fixed a leaves at least the component of a* orthogonal to a
    assert ffa["error"][-1] >= ffa["sin_theta"][0] - 1e-9 > 0.5


def test_writes_plot_and_table(tmp_path):
    text = run_linear(out_dir=tmp_path, setup=LinearSetup(rounds=4))
    assert (tmp_path / "linear.png").stat().st_size > 0
    assert text.count("\n| ") == 4 and "rolora" in text
